"""`lmstack quantize` and quantized models in `lmstack generate`: end to end on a tiny checkpoint."""

import pytest
import torch

from lmstack.cli import main
from lmstack.compress.files import load_quantized
from lmstack.generate import GenerationConfig, generate
from lmstack.tokenizers import load_tokenizer
from tests.recipes.tiny import tiny_llama_dir
from tests.tokenizers.corpus import TRAIN


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_llama_dir(tmp_path_factory.mktemp("quantize") / "model")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("calibration") / "text.txt"
    path.write_text("\n".join(TRAIN * 20))
    return path


def test_quantize_then_generate(model_dir, corpus, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--scheme", "gptq", "--group-size", "32", "--calibration",
                 str(corpus), "--calibration-tokens", "512", "--calibration-seq-len", "64"]) == 0
    printed = capsys.readouterr()
    assert "(gptq):" in printed.out and "MiB ->" in printed.out and "quantizing (gptq)" in printed.err
    assert (out / "tokenizer.json").is_file()
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "(lmstack-quantized, gptq)" in info and "int4 group 32" in info and "weights         all finite" in info
    ids = "5 17 42 9"
    assert main(["generate", "--model", str(out), "--prompt-ids", ids, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    model = load_quantized(out)
    prompt = torch.tensor([[int(i) for i in ids.split()]])
    want = generate(model, prompt, GenerationConfig(max_new_tokens=6, eos_token_id=[]))[0, 4:].tolist()
    assert printed == load_tokenizer(out).decode(want, skip_special_tokens=True) + "\n"


def test_generate_quantizes_on_the_fly(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "the", "--max-new-tokens", "4",
                 "--quantize", "int8"]) == 0
    assert capsys.readouterr().out.strip()


def test_quantize_gguf_needs_a_gguf_file(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--prompt", "the", "--quantize", "gguf"]) == 2
    assert "--quantize gguf keeps a GGUF file's quantized tensors" in capsys.readouterr().err


def test_calibration_text_shorter_than_asked_is_a_clear_error(model_dir, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    assert main(["quantize", str(model_dir), str(tmp_path / "q"), "--scheme", "awq", "--group-size", "32",
                 "--calibration", str(short), "--calibration-tokens", "4096"]) == 2
    err = capsys.readouterr().err
    assert "lmstack quantize: error: calibration text" in err and "asks for 4,096" in err
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.tmp-*"))  # nothing was left behind


def test_unsupported_group_size_is_refused(model_dir, tmp_path, capsys):
    assert main(["quantize", str(model_dir), str(tmp_path / "q"), "--scheme", "int4", "--group-size", "48"]) == 2
    assert "group size must be 32, 64, 128 or 256" in capsys.readouterr().err
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q.tmp-*"))


def test_int8_activations_from_the_command_line(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--scheme", "int4", "--group-size", "32",
                 "--activations", "int8"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "int4 group 32 (int8 activations)" in capsys.readouterr().out
    model = load_quantized(out)
    assert model.quantization["activations"] == "int8"
    ids = "5 17 42 9"
    assert main(["generate", "--model", str(out), "--prompt-ids", ids, "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    want = generate(model, torch.tensor([[5, 17, 42, 9]]), GenerationConfig(max_new_tokens=6, eos_token_id=[]))
    assert printed == load_tokenizer(out).decode(want[0, 4:].tolist(), skip_special_tokens=True) + "\n"
    assert main(["generate", "--model", str(model_dir), "--prompt", "the", "--max-new-tokens", "4",
                 "--quantize", "int8", "--activations", "int8"]) == 0
    assert capsys.readouterr().out.strip()


@pytest.mark.parametrize("argv, message", [
    (["generate", "--prompt", "the", "--activations", "int8"], "--activations int8 needs --quantize int8, int4 or gguf"),
    (["generate", "--prompt", "the", "--quantize", "nf4", "--activations", "int8"], "(got --quantize nf4)"),
    (["quantize", "OUT", "--scheme", "nf4", "--activations", "int8"], "needs int8 or int4 weights"),
])
def test_int8_activations_with_a_scheme_that_cannot_take_them_are_refused(model_dir, tmp_path, capsys, argv, message):
    argv = [a.replace("OUT", str(tmp_path / "q")) for a in argv]
    argv = argv[:1] + ([str(model_dir)] if argv[0] == "quantize" else ["--model", str(model_dir)]) + argv[1:]
    assert main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "q").exists()


def test_quantize_with_the_embedding_from_the_command_line(model_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(out), "--scheme", "int4", "--group-size", "32", "--embedding"]) == 0
    capsys.readouterr()
    assert main(["info", str(out)]) == 0
    assert "embedding       int4 group 32, shared with the LM head" in capsys.readouterr().out
    model = load_quantized(out)
    assert model.embed_tokens.qweight.data_ptr() == model.lm_head.qweight.data_ptr()
    assert main(["generate", "--model", str(out), "--prompt-ids", "5 17 42 9", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    want = generate(model, torch.tensor([[5, 17, 42, 9]]), GenerationConfig(max_new_tokens=6, eos_token_id=[]))
    assert printed == load_tokenizer(out).decode(want[0, 4:].tolist(), skip_special_tokens=True) + "\n"
