"""`lmstack prune`, fine-tuning a pruned checkpoint (its zeros kept; gradual pruning) and `lmstack distill`: end to
end on a tiny checkpoint."""

import json

import pytest
import torch
from safetensors.torch import load_file

from lmstack.checkpoints import load_hf
from lmstack.cli import main
from tests.recipes.tiny import tiny_llama_dir
from tests.tokenizers.corpus import TRAIN

SHORT = ["--train.max_steps", "4", "--train.batch_size", "2", "--train.eval_every", "0", "--train.progress", "false",
         "--train.warmup_steps", "0"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("prune") / "model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(TRAIN * 20))
    return path


def _linear_zeros(directory):
    weights = load_file(directory / "model.safetensors")
    return {k: v == 0 for k, v in weights.items() if k.endswith("proj.weight")}


def test_prune_wanda_then_finetune_keeps_the_zeros(model_dir, corpus, tmp_path, capsys):
    pruned = tmp_path / "wanda"
    assert main(["prune", str(model_dir), str(pruned), "--method", "wanda", "--sparsity", "0.5", "--calibration",
                 str(corpus), "--calibration-tokens", "256", "--calibration-seq-len", "32"]) == 0
    printed = capsys.readouterr().out
    assert "all parameters" in printed and "50.0%" in printed and (pruned / "sparsity.txt").is_file()
    record = json.loads((pruned / "config.json").read_text())["pruning_config"]
    assert record["method"] == "wanda" and record["sparsity"] == 0.5
    zeros = _linear_zeros(pruned)
    assert all(abs(z.float().mean().item() - 0.5) < 0.02 for z in zeros.values())
    out = tmp_path / "ft"
    assert main(["finetune", "--task", "causal_lm", "--model.path", str(pruned), "--data.train", str(corpus),
                 "--data.max_length", "32", "--out", str(out), "--train.lr", "1e-2", *SHORT]) == 0
    after = load_file(out / "model" / "model.safetensors")
    before = load_file(pruned / "model.safetensors")
    for name, was_zero in zeros.items():
        assert torch.all(after[name][was_zero] == 0), name  # pruned weights stayed exactly zero
        assert not torch.equal(after[name], before[name])  # the others trained
    assert json.loads((out / "model" / "config.json").read_text())["pruning_config"]["method"] == "wanda"


def test_structured_prune_gives_a_smaller_checkpoint(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "small"
    assert main(["prune", str(model_dir), str(out), "--method", "none", "--heads", "0.5", "--channels", "0.5",
                 "--layers", "1", "--importance", "activation", "--calibration", str(corpus),
                 "--calibration-tokens", "256", "--calibration-seq-len", "32"]) == 0
    big, small = load_hf(model_dir), load_hf(out)
    assert small.config.n_layers == big.config.n_layers - 1 and small.config.ffn_dim == big.config.ffn_dim // 2
    assert small.config.n_heads < big.config.n_heads
    assert (out / "model.safetensors").stat().st_size < 0.75 * (model_dir / "model.safetensors").stat().st_size
    assert main(["generate", "--model", str(out), "--prompt-ids", "5 6 7", "--max-new-tokens", "3"]) == 0


def test_gradual_pruning_during_finetuning_reaches_its_sparsity(model_dir, corpus, tmp_path):
    out = tmp_path / "gradual"
    assert main(["finetune", "--task", "causal_lm", "--model.path", str(model_dir), "--data.train", str(corpus),
                 "--data.max_length", "32", "--out", str(out), "--prune.sparsity", "0.6", "--prune.every", "1",
                 "--prune.end_step", "3", *SHORT]) == 0
    zeros = _linear_zeros(out / "model")
    assert all(abs(z.float().mean().item() - 0.6) < 0.01 for z in zeros.values())
    record = json.loads((out / "model" / "config.json").read_text())["pruning_config"]
    assert record["schedule"] == {"kind": "cubic", "start_step": 0, "end_step": 3, "every": 1}


def test_gradual_pruning_resumes_exactly(model_dir, corpus, tmp_path, monkeypatch):
    """A run that crashes after its step-3 checkpoint (between prunings at 2 and 4), resumed, ends with the
    weights and losses of one that never stopped (same max_steps: the learning-rate schedule depends on it)."""
    import lmstack.recipes.finetune_lm as finetune_lm

    common = ["finetune", "--task", "causal_lm", "--model.path", str(model_dir), "--data.train", str(corpus),
              "--data.max_length", "32", "--prune.sparsity", "0.5", "--prune.every", "2", "--prune.end_step", "5",
              "--train.batch_size", "2", "--train.eval_every", "0", "--train.progress", "false",
              "--train.warmup_steps", "0", "--train.checkpoint_every", "3", "--train.max_steps", "6"]
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*common, "--out", str(whole)]) == 0
    wanted = finetune_lm.pruning_callbacks

    def crash_at_step_4(*args):
        callbacks, record = wanted(*args)

        def crash(step):
            if step == 4:
                raise RuntimeError("simulated crash")
        return [*callbacks, crash], record

    monkeypatch.setattr(finetune_lm, "pruning_callbacks", crash_at_step_4)
    with pytest.raises(RuntimeError, match="simulated crash"):
        main([*common, "--out", str(cut)])
    monkeypatch.setattr(finetune_lm, "pruning_callbacks", wanted)
    assert main([*common, "--out", str(cut), "--resume"]) == 0
    a, b = load_file(whole / "model" / "model.safetensors"), load_file(cut / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    zeros = [(v == 0).float().mean().item() for k, v in a.items() if k.endswith("proj.weight")]
    assert all(abs(z - 0.5) < 0.02 for z in zeros)  # the end step reached the final sparsity
    losses = lambda run: [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert len(losses(whole)) == 6 and losses(whole) == losses(cut)


def test_pruning_with_peft_is_refused(model_dir, corpus, tmp_path, capsys):
    assert main(["finetune", "--task", "causal_lm", "--model.path", str(model_dir), "--data.train", str(corpus),
                 "--out", str(tmp_path / "x"), "--prune.sparsity", "0.5", "--peft.method", "lora", *SHORT]) == 2
    assert "needs full fine-tuning" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--sparsity", "1.0"], "in [0, 1)"), (["--pattern", "4:4"], "less than M"),
    (["--method", "none"], "prunes nothing"), (["--method", "none", "--heads", "0.9"], "keep at least one"),
])
def test_bad_prune_flags(model_dir, tmp_path, capsys, argv, message):
    assert main(["prune", str(model_dir), str(tmp_path / "p"), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("extra", [["--distill.loss", "kd"],
                                   ["--distill.loss", "jsd", "--distill.hidden_weight", "1",
                                    "--distill.attention_weight", "1", "--distill.mode", "on_policy",
                                    "--distill.prompt_tokens", "8"]])
def test_distill_a_half_depth_student(model_dir, corpus, tmp_path, capsys, extra):
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(model_dir), "--student.layers", "1", "--data.train", str(corpus),
                 "--data.eval", str(corpus), "--data.max_length", "32", "--out", str(out), *SHORT, *extra]) == 0
    student = load_hf(out / "model")
    assert student.config.n_layers == 1
    assert "held-out (student)" in capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert "distill_divergence" in rows[-1] and "eval_bpb" in rows[-1]


def test_distill_keeps_the_most_influential_blocks(model_dir, corpus, tmp_path):
    """--student.pick influence keeps the teacher blocks with the highest block influence on the first training
    blocks (each student block equals that teacher block before training), not the evenly spaced ones."""
    from lmstack.config import resolve
    from lmstack.recipes.configs.distill import DistillConfig
    from lmstack.recipes.distill import calibration_windows, influential_layers, make_student
    from lmstack.checkpoints.model_files import open_model
    from lmstack.recipes.finetune_lm import _token_shards

    files = open_model(model_dir)
    teacher, tokenizer = files.model.float().eval(), files.tokenizer
    cfg = resolve(DistillConfig, None, {"teacher": str(model_dir), "data.train": str(corpus), "out": str(tmp_path),
                                        "data.max_length": "32", "student.layers": "1", "student.pick": "influence"})
    calibration = calibration_windows(_token_shards(cfg, tmp_path, tokenizer, files.stop_ids[0]), 32)
    assert [tuple(w.shape) for w in calibration] == [(1, 32)] * 8
    (kept,) = influential_layers(teacher, 1, calibration)
    assert kept != 0  # what spread(n, 1) would keep: the test tells the two apart
    student = make_student(cfg, teacher, tokenizer, calibration)
    expected = {k.removeprefix(f"layers.{kept}."): v for k, v in teacher.state_dict().items()
                if k.startswith(f"layers.{kept}.")}
    got = {k.removeprefix("layers.0."): v for k, v in student.state_dict().items() if k.startswith("layers.0.")}
    assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)


def test_distill_refuses_a_student_of_another_vocabulary(model_dir, corpus, tmp_path, capsys):
    from lmstack.checkpoints import save_hf
    from lmstack.models import DecoderConfig, build_model

    other = tmp_path / "other"
    config = load_hf(model_dir).config
    save_hf(build_model(DecoderConfig(**{**config.__dict__, "vocab_size": config.vocab_size + 8})), other)
    (other / "tokenizer.json").write_text((model_dir / "tokenizer.json").read_text())
    assert main(["distill", "--teacher", str(model_dir), "--student.path", str(other), "--data.train", str(corpus),
                 "--out", str(tmp_path / "s"), *SHORT]) == 2
    assert "different vocabularies" in capsys.readouterr().err
