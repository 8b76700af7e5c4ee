"""`lmstack pretrain`: the CLI contract, outputs, and every bad input named clearly."""

import json
from pathlib import Path

import pytest
import yaml

from lmstack.checkpoints import load_hf
from lmstack.cli import main
from lmstack.config import resolve
from lmstack.recipes.pretrain import PretrainConfig
from lmstack.tokenizers import load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
TINY = str(ROOT / "configs/pretrain/tiny.yaml")
QUICK = ["--train.max_steps", "6", "--train.eval_every", "3", "--train.checkpoint_every", "3",
         "--train.progress", "false", "--tokenizer.vocab_size", "300"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert main(["pretrain", "--config", TINY, "--out", str(out), "--seed", "7", *QUICK]) == 0
    return out


def test_outputs_and_metrics_contract(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(isinstance(r["loss"], float) for r in records)
    assert {"eval_loss", "eval_ppl", "eval_bpb"} <= records[2].keys() and "eval_loss" not in records[1]
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["seed"] == 7 and saved["train"]["max_steps"] == 6 and saved["tokenizer"]["vocab_size"] == 300
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_hf(run_dir / "model")
    assert model.config.vocab_size == 300  # the tokenizer's
    assert load_tokenizer(run_dir / "model").vocab_size == 300
    checkpoint = run_dir / "checkpoints" / "step-0000006"
    assert (checkpoint / "tokenizer.json").exists() and (checkpoint / "pretrain.yaml").exists()
    assert load_hf(checkpoint).config == model.config


def test_resume_continues_to_a_raised_max_steps(run_dir):
    assert main(["pretrain", "--config", TINY, "--out", str(run_dir), "--seed", "7", *QUICK,
                 "--train.max_steps", "8", "--resume"]) == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_bad_inputs_are_named(tmp_path, capsys, run_dir):
    out = ["--out", str(tmp_path / "x")]
    assert "train.max_steps must be at least 1" in _error(capsys, ["pretrain", "--config", TINY, *out, *QUICK,
                                                                   "--train.max_steps", "0"])
    assert "exceeds the model's context of 128" in _error(capsys, ["pretrain", "--config", TINY, *out, *QUICK,
                                                                   "--data.block_size", "200"])
    assert "the tokenizer has 300 tokens but the model's vocabulary is 256" in _error(
        capsys, ["pretrain", "--config", TINY, *out, *QUICK, "--model.vocab_size", "256"])
    (tmp_path / "empty.txt").write_text("\n\n")
    assert "empty corpus" in _error(capsys, ["pretrain", "--config", TINY, *out, *QUICK,
                                             "--data.sources", f"[{tmp_path / 'empty.txt'}]"])
    assert "already holds checkpoints" in _error(capsys, ["pretrain", "--config", TINY, "--out", str(run_dir), *QUICK])
    assert "changed config (model.dim: None -> 128)" in _error(
        capsys, ["pretrain", "--config", TINY, "--out", str(run_dir), "--seed", "7", *QUICK, "--model.dim", "128",
                 "--resume"])
    assert "no checkpoint" in _error(capsys, ["pretrain", "--config", TINY, *out, *QUICK, "--resume"])
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("train:\n  max_step: 5\n")
    assert "unknown config key 'train.max_step'; did you mean 'train.max_steps'?" in _error(
        capsys, ["pretrain", "--config", str(bad_yaml), *out])
    assert "--out is required" in _error(capsys, ["pretrain", "--config", TINY])
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", TINY, *out, "--train.max_steps", "many"])


def test_every_shipped_config_resolves():
    from lmstack.recipes.finetune import FinetuneConfig

    jobs = {"pretrain": PretrainConfig, "finetune": FinetuneConfig}
    paths = sorted((ROOT / "configs").rglob("*.yaml"))
    assert {p.parent.name for p in paths} == set(jobs)
    for path in paths:
        cfg = resolve(jobs[path.parent.name], path, {"out": "unused"})
        assert cfg.train.max_steps > 0, path
        assert f"--config configs/{path.parent.name}/{path.name}" in path.read_text().splitlines()[1], path


def test_mixture_of_experts_recipe(tmp_path, capsys):
    """configs/pretrain/shakespeare-moe.yaml's model section at a tiny size: a Mixtral checkpoint, the router's
    numbers per step and their plot."""
    out = tmp_path / "moe"
    moe = ["--model.preset", "tiny-llama", "--model.moe.num_experts", "4", "--model.moe.top_k", "2",
           "--model.moe.capacity_factor", "1.0"]
    assert main(["pretrain", "--config", TINY, "--out", str(out), *QUICK, *moe]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in records:
        assert r["loss"] > r["lm_loss"] and r["moe_aux_loss"] > 0 and 0 <= r["moe_dropped"] < 1
        assert sum(r[f"moe_load_{e}"] for e in range(4)) == pytest.approx(1.0)
    assert (out / "router.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model = load_hf(out / "model")
    assert model.config.model_type == "mixtral" and model.config.moe.num_experts == 4
    assert model.config.moe.capacity_factor == 1.0  # saved with the checkpoint (router_capacity_factor)
    capsys.readouterr()
    assert main(["info", str(out / "model")]) == 0
    assert "experts         4 per MoE layer (2 of 2 layers), top-2, width" in capsys.readouterr().out


def test_mixture_of_experts_keys_need_experts(tmp_path, capsys):
    assert "set moe.num_experts to make it a mixture" in _error(
        capsys, ["pretrain", "--config", TINY, "--out", str(tmp_path / "x"), *QUICK, "--model.moe.top_k", "2"])
    assert "moe.top_k=5 exceeds moe.num_experts=4" in _error(
        capsys, ["pretrain", "--config", TINY, "--out", str(tmp_path / "x"), *QUICK, "--model.moe.num_experts", "4",
                 "--model.moe.top_k", "5"])
    assert "a gpt2 checkpoint cannot hold this config: fields ['moe'] cannot be expressed" in _error(
        capsys, ["pretrain", "--config", TINY, "--out", str(tmp_path / "x"), *QUICK, "--model.moe.num_experts", "4"])
