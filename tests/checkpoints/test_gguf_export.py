"""GGUF export (`lmstack convert DIR FILE.gguf --type T`): quantizers equal to ggml's reference (the gguf
package), files the gguf reader and transformers read back, our import giving the same logits, and the
tokenizer carried along."""

import numpy as np
import pytest
import torch

from lmstack.checkpoints import load_hf, save_hf
from lmstack.checkpoints.gguf import load_gguf
from lmstack.checkpoints.gguf_export import permute_rope_rows, save_gguf
from lmstack.checkpoints.gguf_quants import dequantize, quantize
from lmstack.checkpoints.model_files import open_model
from lmstack.cli import main
from lmstack.errors import ConfigError
from lmstack.models import DecoderConfig, build_model
from lmstack.tokenizers import load_tokenizer, train_bpe
from tests.tokenizers.corpus import TRAIN

gguf = pytest.importorskip("gguf")
TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")


@pytest.mark.parametrize("kind", TYPES)
def test_quantizers_equal_ggml_reference(kind):
    rng = np.random.default_rng(0)
    values = (rng.standard_normal((16, 256)) * rng.uniform(0.01, 3, (16, 1))).astype(np.float32)
    values[2, :32] = 0  # an all-zero block
    values[5, :32] = 1.5  # a constant block
    theirs = gguf.quants.quantize(values, gguf.GGMLQuantizationType[kind])
    assert np.array_equal(theirs.reshape(-1).view(np.uint8), quantize(values, kind).reshape(-1).view(np.uint8))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    config = DecoderConfig(vocab_size=400, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96, max_seq_len=64,
                           norm="rmsnorm", mlp="gated", activation="silu", position="rope", tie_embeddings=False,
                           model_type="llama", bos_token_id=0, eos_token_id=0)
    model = build_model(config, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.2)  # norms too, so a misplaced tensor shows in the logits
    directory = save_hf(model, tmp_path_factory.mktemp("export") / "model")
    train_bpe(TRAIN, 400, special_tokens=["<|endoftext|>"]).save(directory)
    (directory / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    return directory


@pytest.mark.parametrize("kind", TYPES)
def test_exported_files_read_back_with_the_same_tensors_and_logits(model_dir, tmp_path, kind, capsys):
    out = tmp_path / f"model.{kind.lower()}.gguf"
    assert main(["convert", str(model_dir), str(out), "--type", kind.lower()]) == 0
    assert f"({kind.lower()}," in capsys.readouterr().out
    model = load_hf(model_dir)
    reader = gguf.GGUFReader(str(out))
    stored = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "llama"
    assert reader.fields["llama.block_count"].contents() == 2
    q = stored["blk.1.attn_q.weight"]
    assert q.tensor_type.name == ("F32" if kind == "F32" else kind) and stored["output_norm.weight"].tensor_type.name == "F32"
    # the reference dequantisation of what we wrote equals our quantize -> dequantize of the permuted weight
    expected = permute_rope_rows(model.layers[1].attn.q_proj.weight.detach(), 4).numpy()
    want = dequantize(quantize(expected, kind), kind, expected.size).reshape(expected.shape)
    got = gguf.quants.dequantize(q.data, q.tensor_type).reshape(expected.shape)
    np.testing.assert_array_equal(got, want)
    # our import of the file: the model with the dequantised weights (F32: the model itself)
    imported = load_gguf(out)
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if kind == "F32":
            torch.testing.assert_close(imported(ids), model(ids), rtol=1e-5, atol=1e-5)
        else:
            assert ((imported(ids) - model(ids)).square().mean() / model(ids).square().mean()) < 0.05


def test_transformers_reads_the_exported_file_with_equal_logits(model_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    save_gguf(load_hf(model_dir), tmp_path / "m.gguf", "F32", _tokenizer_meta(model_dir))
    theirs = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf").eval()
    ids = torch.randint(0, 400, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(theirs(ids).logits, load_hf(model_dir)(ids), rtol=1e-4, atol=1e-4)


def _tokenizer_meta(model_dir):
    import json

    from lmstack.checkpoints.gguf_export import tokenizer_metadata

    return tokenizer_metadata(json.loads((model_dir / "tokenizer.json").read_text()), load_hf(model_dir).config)


def test_the_tokenizer_and_chat_template_travel_in_the_file(model_dir, tmp_path):
    out = tmp_path / "m.gguf"
    assert main(["convert", str(model_dir), str(out), "--type", "q8_0"]) == 0
    files = open_model(out)
    original = load_tokenizer(model_dir)
    for text in ("To be, or not to be", "the king's 42 horses", " spaced  out "):
        assert files.tokenizer.encode(text) == original.encode(text)
    assert files.chat_template.text.startswith("{% for m in messages %}")
    # and back: GGUF -> GGUF copies the tokenizer metadata
    again = tmp_path / "again.gguf"
    assert main(["convert", str(out), str(again), "--type", "f16"]) == 0
    assert open_model(again).tokenizer.encode("To be, or not to be") == original.encode("To be, or not to be")


def test_what_cannot_be_exported_is_refused(model_dir, tmp_path, capsys):
    gpt2 = build_model("tiny-gpt2", seed=0)
    with pytest.raises(ConfigError, match="supports llama, mistral and qwen2 models, not gpt2"):
        save_gguf(gpt2, tmp_path / "g.gguf", "F32")
    from lmstack.compress import quantize_

    with pytest.raises(ConfigError, match="has no GGUF name .a quantized or adapted model"):
        save_gguf(quantize_(load_hf(model_dir), "int8"), tmp_path / "q.gguf", "Q8_0")
    assert not (tmp_path / "q.gguf").exists()
    with pytest.raises(ConfigError, match="'Q5_K' is not supported"):
        save_gguf(load_hf(model_dir), tmp_path / "k.gguf", "Q5_K")
    assert main(["convert", str(model_dir), str(tmp_path / "x.gguf"), "--dtype", "bfloat16"]) == 2
    assert "--dtype applies to Hugging Face output" in capsys.readouterr().err


# --- GGUF's Q8_0 / Q4_0 / Q4_1 loaded as they are --------------------------------------------------------------

@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("tied", [False, True])
def test_block_quantized_tensors_load_without_an_fp32_copy_with_equal_values(model_dir, tmp_path, kind, tied):
    from lmstack.compress import QuantizedLinear
    from lmstack.compress.gguf_weights import load_gguf_quantized

    model = load_hf(model_dir)
    if tied:
        model = build_model(model.config.replace(tie_embeddings=True), seed=1)
    path = save_gguf(model, tmp_path / "m.gguf", kind, _tokenizer_meta(model_dir))
    fp32, kept = load_gguf(path), load_gguf_quantized(path)
    layers = {n: m for n, m in kept.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(layers) == 2 * 7 + 1 and not any(isinstance(m, torch.nn.Linear) for m in kept.modules())
    assert {m.scheme for m in layers.values()} == {"int8" if kind == "Q8_0" else "int4"}
    for name, layer in layers.items():  # the same values as the fp32 import, bit for bit
        assert torch.equal(layer.dequantize(), fp32.get_submodule(name).weight), name
    ids = torch.randint(0, 400, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(kept(ids), fp32(ids), rtol=1e-4, atol=1e-4)


def test_the_bundled_q4_1_model_decodes_the_same_tokens_kept_quantized():
    from lmstack.compress.gguf_weights import load_gguf_quantized
    from lmstack.generate import GenerationConfig, generate
    from lmstack.kernels import use_skinny_linears_
    from lmstack.recipes.bundled import resolve_model_dir

    path = resolve_model_dir("smollm2-135m-instruct")
    files = open_model(path)
    kept = use_skinny_linears_(load_gguf_quantized(path), hugepages=False)
    prompt = torch.tensor([files.tokenizer.encode("The capital of France is")])
    config = GenerationConfig(max_new_tokens=8, eos_token_id=[])
    assert torch.equal(generate(kept, prompt, config), generate(files.model, prompt, config))
    assert kept.lm_head.scheme == "int8" and kept.layers[0].mlp.up_proj.scheme == "int4"
