"""The training commands under ``torchrun`` (one 2-rank launch for the module, running several command lines):
``lmstack pretrain`` / ``finetune --task causal_lm`` with --parallel.* train like the same command in one
process, resume a run at another strategy, export a plain Hugging Face folder from rank 0; ``sft`` trains a
LoRA adapter on replicas (DDP and ZeRO-1) equal to one process; bad layouts are named on every rank.

Tolerances as in test_two_ranks.py: losses 1e-5, exported weights 1e-4 (fp32 reduction order). SFT rows have
unequal token counts: each rank's loss is weighted by its share of the step's scored tokens (the Trainer's
``loss_items``), so data-parallel SFT also equals one process.
"""

import json
import subprocess
import sys

import pytest
import torch

from lmstack.checkpoints import load_hf
from lmstack.cli import main
from lmstack.peft import load_adapter
from lmstack.train.trainer import read_metrics
from tests.parallel.conftest import ROOT, free_port, worker_env
from tests.recipes.tiny import tiny_llama_dir
from tests.tokenizers.corpus import TRAIN

WORKER = ROOT / "tests/parallel/recipe_worker.py"
QUIET = ["--train.progress", "false"]
PRETRAIN = ["pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--train.max_steps", "6",
            "--train.eval_every", "3", "--train.checkpoint_every", "3", "--tokenizer.vocab_size", "300", *QUIET]
CHATS = [("What is your name?", "I am a tiny model."), ("How are you?", "Fine, thank you."),
         ("Tell me a joke.", "Why did the cat sit? To rest."), ("What is two plus two?", "Four.")]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recipes")
    base = tiny_llama_dir(root / "base")
    text = root / "notes.jsonl"
    text.write_text("".join(json.dumps({"text": line}) + "\n" for line in TRAIN * 8))
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n" for q, a in CHATS))
    finetune = ["finetune", "--task", "causal_lm", "--model.path", str(base), "--data.train", str(text),
                "--data.max_length", "32", "--train.batch_size", "4", "--train.max_steps", "4",
                "--train.eval_every", "0", *QUIET]
    sft = ["sft", "--model.path", str(base), "--data.train", str(chats), "--data.max_length", "96",
           "--train.batch_size", "2", "--train.max_steps", "3", "--train.eval_every", "0", "--peft.method", "lora",
           *QUIET]
    cases = [
        {"name": "ddp", "argv": [*PRETRAIN, "--out", str(root / "ddp"), "--parallel.dp", "2"]},
        {"name": "tp", "argv": [*PRETRAIN, "--out", str(root / "tp"), "--parallel.tp", "2"]},
        {"name": "zero3", "argv": [*PRETRAIN, "--out", str(root / "zero3"), "--parallel.strategy", "zero3"]},
        {"name": "resumed", "copy_from": [str(root / "zero3"), 3, str(root / "resumed")],  # zero3 -> ddp at step 3
         "argv": [*PRETRAIN, "--out", str(root / "resumed"), "--resume"]},
        {"name": "finetune", "argv": [*finetune, "--out", str(root / "finetune"), "--parallel.strategy", "zero2"]},
        {"name": "sft", "argv": [*sft, "--out", str(root / "sft")]},
        {"name": "sft_zero1", "argv": [*sft, "--out", str(root / "sft1"), "--parallel.strategy", "zero1"]},
        {"name": "sft_zero3", "argv": [*sft, "--out", str(root / "sft3"), "--parallel.strategy", "zero3"]},
        {"name": "bad_world", "argv": [*PRETRAIN, "--out", str(root / "bad"), "--parallel.tp", "3"]},
    ]
    (root / "cases.json").write_text(json.dumps(cases))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(free_port()), str(WORKER), str(root / "cases.json"), str(root)]
    result = subprocess.run(command, env=worker_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    # The one-process references: the same command lines without --parallel.*.
    assert main([*PRETRAIN, "--out", str(root / "single")]) == 0
    assert main([*finetune, "--out", str(root / "finetune_single")]) == 0
    assert main([*sft, "--out", str(root / "sft_single")]) == 0
    outcome = {c["name"]: [json.loads((root / f"{c['name']}-rank{r}.json").read_text()) for r in (0, 1)]
               for c in cases}
    return root, outcome


def _losses(run):
    return [r["loss"] for r in read_metrics(run / "metrics.jsonl")]


def _weights_close(a, b, atol=1e-4):
    sa, sb = load_hf(a).state_dict(), load_hf(b).state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=atol, rtol=0, msg=k)


@pytest.mark.parametrize("name", ["ddp", "tp", "zero3"])
def test_pretrain_under_torchrun_trains_like_one_process(runs, name):
    root, outcome = runs
    assert [o["code"] for o in outcome[name]] == [0, 0], outcome[name]
    single = _losses(root / "single")
    assert len(single) == 6
    torch.testing.assert_close(_losses(root / name), single, atol=1e-5, rtol=0)
    _weights_close(root / name / "model", root / "single" / "model")  # rank 0's export, whatever the layout
    assert (root / name / "loss.png").is_file() and (root / name / "tokenizer" / "tokenizer.json").is_file()
    assert (root / name / "checkpoints" / "step-0000006" / "sharded").is_dir()


def _like_one_process(runs, name, run, single):
    """Case ``name`` ran on both ranks and its run directory ``run`` logged the losses and exported the weights of
    the one-process run ``single``."""
    root, outcome = runs
    assert [o["code"] for o in outcome[name]] == [0, 0], outcome[name]
    torch.testing.assert_close(_losses(root / run), _losses(root / single), atol=1e-5, rtol=0)
    _weights_close(root / run / "model", root / single / "model")


def test_pretrain_resumes_at_another_strategy(runs):
    _like_one_process(runs, "resumed", "resumed", "single")


def test_finetune_causal_lm_under_torchrun(runs):
    _like_one_process(runs, "finetune", "finetune", "finetune_single")


@pytest.mark.parametrize("name, run", [("sft", "sft"), ("sft_zero1", "sft1")])
def test_sft_lora_on_replicas_trains_like_one_process_and_exports(runs, name, run):
    # Rows of unequal length, one per rank: equal to one process only through token-weighted losses.
    _like_one_process(runs, name, run, "sft_single")
    root, _ = runs
    assert len(read_metrics(root / run / "metrics.jsonl")) == 3
    assert (root / run / "adapter" / "adapter_config.json").is_file()
    load_adapter(load_hf(root / "base"), root / run / "adapter")  # rank 0's adapter loads onto the base


def test_bad_layouts_are_named_on_every_rank(runs):
    _, outcome = runs
    for name, needle in (("sft_zero3", "a PEFT run trains its adapters on data-parallel replicas"),
                         ("bad_world", "does not factor into parallel.pp=1")):
        for rank in outcome[name]:
            assert rank["code"] == 2 and needle in rank["stderr"], (name, rank)
            assert "Traceback" not in rank["stderr"]


def test_parallel_flags_without_torchrun_are_refused(tmp_path, capsys):
    assert main([*PRETRAIN, "--out", str(tmp_path / "x"), "--parallel.tp", "2"]) == 2
    assert "parallel.tp is set but this is one process" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
