"""`lmstack sft`, `lmstack dpo` and `lmstack reward` end to end on the tiny decoder: they train, log the
objective's numbers, resume, and export models that load (a reward model in transformers' seq-cls class)."""

import json

import pytest
import torch

from lmstack.checkpoints import load_hf
from lmstack.cli import main
from lmstack.train.trainer import read_metrics
from tests.recipes.tiny import tiny_llama_dir

QUESTIONS = ["What is your name?", "How are you?", "Tell me a joke.", "What is two plus two?", "Where do you live?",
             "Do you like music?"]
ANSWERS = ["I am a tiny model.", "Fine, thank you.", "Why did the cat sit? To rest.", "Four.", "In a computer.",
           "Yes, very much."]
COMMON = ["--train.max_steps", "3", "--train.batch_size", "2", "--train.warmup_steps", "0", "--train.eval_every",
          "0", "--train.progress", "false", "--data.max_length", "96"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("align")
    model = tiny_llama_dir(root / "model")
    chats = root / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q},
                                                      {"role": "assistant", "content": a}]}) + "\n"
                             for q, a in zip(QUESTIONS, ANSWERS)))
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": q, "chosen": " " + a, "rejected": " no."}) + "\n"
                             for q, a in zip(QUESTIONS, ANSWERS)))
    return {"model": model, "chats": chats, "pairs": pairs}


def test_sft_packed_run_trains_and_exports(files, tmp_path):
    out = tmp_path / "sft"
    main(["sft", "--model.path", str(files["model"]), "--data.train", str(files["chats"]), "--data.eval",
          str(files["chats"]), "--data.packing", "true", "--out", str(out), *COMMON])
    records = read_metrics(out / "metrics.jsonl")
    assert len(records) == 3 and "eval_loss" in records[-1]
    assert load_hf(out / "model").config.vocab_size > 0 and (out / "loss.png").is_file()


def test_dpo_lora_logs_rewards_and_resumes(files, tmp_path):
    out = tmp_path / "dpo"
    args = ["dpo", "--model.path", str(files["model"]), "--data.train", str(files["pairs"]), "--loss", "ipo",
            "--peft.method", "lora", "--out", str(out), *COMMON]
    main(args)
    first = read_metrics(out / "metrics.jsonl")
    assert {"reward_margin", "reward_accuracy", "logps_chosen"} <= set(first[-1])
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "model" / "config.json").is_file()
    main([*args[:-len(COMMON)], *COMMON[:1], "4", *COMMON[2:], "--resume"])
    again = read_metrics(out / "metrics.jsonl")
    assert [r["loss"] for r in again[:3]] == [r["loss"] for r in first] and len(again) == 4


def test_reward_model_loads_in_transformers_with_the_same_scores(files, tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "rm"
    main(["reward", "--model.path", str(files["model"]), "--data.train", str(files["pairs"]), "--data.eval",
          str(files["pairs"]), "--out", str(out), *COMMON])
    assert "eval_accuracy" in read_metrics(out / "metrics.jsonl")[-1]
    ours = load_hf(out / "model").eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model", dtype=torch.float32).eval()
    ids = torch.randint(1, 300, (2, 7))
    with torch.no_grad():
        assert torch.allclose(ours(ids)[:, -1], theirs(input_ids=ids).logits, atol=1e-5)


def test_bad_alignment_data_is_named(files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert main(["sft", "--model.path", str(files["model"]), "--data.train", str(bad), "--out", str(tmp_path / "o"),
                 *COMMON]) == 2
    assert "row 1: the conversation has no assistant turn" in capsys.readouterr().err
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "a", "chosen": " b", "rejected": " b"}) + "\n")
    assert main(["dpo", "--model.path", str(files["model"]), "--data.train", str(same), "--out", str(tmp_path / "p"),
                 *COMMON]) == 2
    assert "1 chosen == rejected" in capsys.readouterr().err
