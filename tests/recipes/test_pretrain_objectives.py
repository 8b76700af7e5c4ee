"""`lmstack pretrain` with the encoder objectives: masked LM (whole-word), MLM + NSP and T5 span corruption
each run from their shipped YAML, learn (held-out loss falls), resume, and export checkpoints that
transformers loads with the same outputs."""

import json
from pathlib import Path

import pytest
import torch

from lmstack.checkpoints import load_hf
from lmstack.cli import main

ROOT = Path(__file__).resolve().parents[2]
QUICK = ["--train.max_steps", "40", "--train.eval_every", "20", "--train.checkpoint_every", "20",
         "--train.progress", "false", "--train.eval_batches", "4"]
CASES = {"tiny-bert-mlm": "BertForMaskedLM", "tiny-bert-nsp": "BertForPreTraining", "tiny-t5-span": "T5ForConditionalGeneration"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_objective_trains_and_exports(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / name
    assert main(["pretrain", "--config", str(ROOT / f"configs/pretrain/{name}.yaml"), "--out", str(out), *QUICK]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r["eval_loss"] for r in records if "eval_loss" in r]
    assert evals[-1] < evals[0]
    if name == "tiny-bert-nsp":
        assert "eval_nsp_accuracy" in records[-1]
    model = load_hf(out / "model")
    reference = getattr(transformers, CASES[name]).from_pretrained(out / "model").eval()
    assert type(reference).__name__ == json.loads((out / "model/config.json").read_text())["architectures"][0]
    ids = torch.randint(5, 300, (2, 20))
    with torch.no_grad():
        if name.startswith("tiny-t5"):
            dec = torch.randint(5, 300, (2, 7))
            torch.testing.assert_close(model(ids, None, dec), reference(input_ids=ids, decoder_input_ids=dec).logits,
                                       atol=1e-4, rtol=0)
        else:
            got = model(ids).logits
            torch.testing.assert_close(got, reference(input_ids=ids)[0], atol=1e-4, rtol=0)


def test_masked_lm_resume_continues_the_same_run(tmp_path):
    args = ["pretrain", "--config", str(ROOT / "configs/pretrain/tiny-bert-mlm.yaml"), "--train.progress", "false",
            "--train.eval_every", "0", "--train.checkpoint_every", "4"]
    straight, resumed = tmp_path / "a", tmp_path / "b"
    assert main([*args, "--out", str(straight), "--train.max_steps", "8"]) == 0
    assert main([*args, "--out", str(resumed), "--train.max_steps", "4"]) == 0
    assert main([*args, "--out", str(resumed), "--train.max_steps", "8", "--resume"]) == 0
    losses = lambda d: [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines()]  # noqa: E731
    assert losses(straight) == losses(resumed)


def test_objective_and_preset_must_agree(tmp_path, capsys):
    assert main(["pretrain", "--config", str(ROOT / "configs/pretrain/tiny.yaml"), "--out", str(tmp_path / "x"),
                 "--objective", "masked_lm", "--train.max_steps", "1", "--tokenizer.vocab_size", "300"]) == 2
    assert "trains an Encoder model" in capsys.readouterr().err
