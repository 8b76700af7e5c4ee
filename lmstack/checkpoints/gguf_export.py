"""GGUF export: an lmstack decoder -> a GGUF file llama.cpp runs (F32, F16, Q8_0, Q4_0, Q4_1).

The inverse of ``gguf.load_gguf`` for the llama layout (llama, mistral, qwen2): the metadata llama.cpp's
converter writes for the same model, tensors renamed to GGUF's names, q/k rows permuted the way llama.cpp
lays out RoPE, matrices quantized with ggml's reference quantizers (``gguf_quants.quantize``; 1-D tensors
and matrices whose rows are not whole blocks of 32 stay F32). The tokenizer comes as GGUF metadata:
copied from a GGUF source, or made from a byte-level BPE tokenizer.json (``tokenizer_metadata``).

    save_gguf(model, "model.q8_0.gguf", "Q8_0", tokenizer_metadata(tokenizer_json, model.config))
"""

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmstack.checkpoints.gguf import _LLAMA_BLOCK, _LLAMA_NAMES
from lmstack.checkpoints.gguf_quants import quantize
from lmstack.checkpoints.gguf_tokenizer import CONTROL, PRE_TOKENIZERS, USER_DEFINED
from lmstack.checkpoints.gguf_writer import BOOL, FLOAT32, INT32, STRING, UINT32, TensorData, Value, write_gguf
from lmstack.errors import ConfigError
from lmstack.models.registry import family_for_config

EXPORT_TYPES = ("F32", "F16", "Q8_0", "Q4_0", "Q4_1")
_FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7}  # llama.cpp's general.file_type
_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2"}
# Our names -> GGUF's: the import's maps (gguf.py), inverted, so the two directions cannot drift apart.
_BLOCK_NAMES = {ours: theirs for theirs, ours in _LLAMA_BLOCK.items()}
_TOP_NAMES = {ours: theirs for theirs, ours in _LLAMA_NAMES.items()}


def permute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (per head, the two RoPE halves interleaved); ``unpermute_rope_rows`` undoes it."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def architecture_metadata(config, name: str) -> tuple[str, dict[str, Any]]:
    """(GGUF architecture, its metadata) for a decoder config.

    Raises:
        ConfigError: a family or feature the llama layout cannot express.
    """
    family = family_for_config(config)
    arch = _ARCHITECTURES.get(family.model_type)
    if arch is None:
        raise ConfigError(f"GGUF export supports llama, mistral and qwen2 models, not {family.model_type}")
    if config.rope_scaling is not None and config.rope_scaling.kind != "linear":
        raise ConfigError(f"GGUF export: RoPE scaling {config.rope_scaling.kind!r} is not supported (linear only)")
    meta = {"general.architecture": arch, "general.name": name,
            f"{arch}.context_length": config.max_seq_len, f"{arch}.embedding_length": config.dim,
            f"{arch}.feed_forward_length": config.ffn_dim, f"{arch}.block_count": config.n_layers,
            f"{arch}.attention.head_count": config.n_heads, f"{arch}.attention.head_count_kv": config.n_kv_heads,
            f"{arch}.attention.layer_norm_rms_epsilon": float(config.norm_eps),
            f"{arch}.rope.freq_base": float(config.rope_theta), f"{arch}.vocab_size": config.vocab_size}
    if arch == "llama":
        meta[f"{arch}.rope.dimension_count"] = config.head_dim
    if config.head_dim != config.dim // config.n_heads:
        meta[f"{arch}.attention.key_length"] = meta[f"{arch}.attention.value_length"] = config.head_dim
    if config.rope_scaling is not None:
        meta[f"{arch}.rope.scaling.type"] = "linear"
        meta[f"{arch}.rope.scaling.factor"] = float(config.rope_scaling.factor)
    if family.model_type == "mistral" and config.sliding_window:
        meta[f"{arch}.attention.sliding_window"] = config.sliding_window
    return arch, meta


def gguf_tensors(model: nn.Module, kind: str) -> dict[str, TensorData]:
    """GGUF name -> quantized tensor for every tensor of ``model`` (a tied head is stored once, as llama.cpp does)."""
    config, state = model.config, model.state_dict()
    tensors = {}
    for ours, value in state.items():
        if ours == "lm_head.weight" and config.tie_embeddings:
            continue
        name = _gguf_name(ours)
        value = value.detach().float()
        if ours.endswith(("q_proj.weight", "q_proj.bias")):
            value = permute_rope_rows(value, config.n_heads)
        elif ours.endswith(("k_proj.weight", "k_proj.bias")):
            value = permute_rope_rows(value, config.n_kv_heads)
        stored = kind if value.dim() == 2 and (kind in ("F32", "F16") or value.shape[1] % 32 == 0) else "F32"
        tensors[name] = TensorData(stored, tuple(value.shape), quantize(value.numpy(), stored))
    return tensors


def _gguf_name(ours: str) -> str:
    if ours in _TOP_NAMES:
        return _TOP_NAMES[ours]
    parts = ours.split(".", 2)
    if len(parts) == 3 and parts[0] == "layers" and parts[2] in _BLOCK_NAMES:
        return f"blk.{parts[1]}.{_BLOCK_NAMES[parts[2]]}"
    raise ConfigError(f"GGUF export: tensor {ours!r} has no GGUF name (a quantized or adapted model must be "
                      "dequantized or merged first)")


def save_gguf(model: nn.Module, path: str | Path, kind: str = "Q8_0", tokenizer: dict[str, Any] | None = None,
              name: str = "lmstack model") -> Path:
    """Write ``model`` as a GGUF file of tensor type ``kind``, with ``tokenizer`` metadata (``tokenizer.*`` keys).

    Raises:
        ConfigError: an unsupported type, family or feature.
    """
    if kind not in EXPORT_TYPES:
        raise ConfigError(f"GGUF export type {kind!r} is not supported; choose one of {', '.join(EXPORT_TYPES)}")
    arch, meta = architecture_metadata(model.config, name)
    meta["general.file_type"] = _FILE_TYPES[kind]
    if kind.startswith("Q"):
        meta["general.quantization_version"] = 2
    meta.update(tokenizer or {})
    with torch.no_grad():
        tensors = gguf_tensors(model, kind)  # every name checked before anything is written
    return write_gguf(path, meta, tensors)


def tokenizer_metadata(data: dict[str, Any], config, chat_template: str | None = None) -> dict[str, Any]:
    """GGUF ``tokenizer.*`` metadata for a byte-level BPE tokenizer.json object ``data``.

    Raises:
        ConfigError: a tokenizer that is not byte-level BPE, or whose pre-tokenizer llama.cpp has no name for.
    """
    model = data.get("model") or {}
    if model.get("type") != "BPE" or not _is_byte_level(data):
        raise ConfigError("GGUF export: only byte-level BPE tokenizers (GPT-2 style) can be written")
    pre = next((name for name, (normalizer, pre_tokenizer, _) in PRE_TOKENIZERS.items()
                if normalizer == data.get("normalizer") and _same_pre(pre_tokenizer, data.get("pre_tokenizer"))), None)
    if pre is None:
        raise ConfigError("GGUF export: the tokenizer's pre-tokenizer matches none llama.cpp names "
                          f"({', '.join(sorted(PRE_TOKENIZERS))})")
    vocab = dict(model["vocab"])
    added = {t["content"]: t for t in data.get("added_tokens") or []}
    for content, token in added.items():
        vocab[content] = token["id"]
    tokens = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        tokens[i] = token
    types = [CONTROL if t in added and added[t].get("special") else USER_DEFINED if t in added else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": Value(STRING, tokens, True),
            "tokenizer.ggml.token_type": Value(INT32, types, True), "tokenizer.ggml.merges": Value(STRING, merges, True),
            "tokenizer.ggml.add_bos_token": Value(BOOL, False)}
    for key, value in (("bos_token_id", config.bos_token_id), ("eos_token_id", config.eos_token_id),
                       ("padding_token_id", config.pad_token_id)):
        value = value[0] if isinstance(value, list) and value else value
        if isinstance(value, int):
            meta[f"tokenizer.ggml.{key}"] = Value(UINT32, value)
    if chat_template:
        meta["tokenizer.chat_template"] = chat_template
    return meta


def copy_tokenizer_metadata(metadata: dict[str, Any]) -> dict[str, Any]:
    """The ``tokenizer.*`` keys of a GGUF file's metadata, with the types llama.cpp expects."""
    out = {}
    for key, value in metadata.items():
        if not key.startswith("tokenizer."):
            continue
        if key.endswith("_token_id"):
            out[key] = Value(UINT32, int(value))
        elif key == "tokenizer.ggml.token_type":
            out[key] = Value(INT32, [int(v) for v in value], True)
        elif key == "tokenizer.ggml.scores":
            out[key] = Value(FLOAT32, [float(v) for v in value], True)
        elif isinstance(value, (list, np.ndarray)):
            out[key] = Value(STRING, list(value), True)
        else:
            out[key] = value
    return out


def _is_byte_level(data: dict[str, Any]) -> bool:
    decoder = data.get("decoder") or {}
    return decoder.get("type") == "ByteLevel" or "ByteLevel" in str(data.get("pre_tokenizer"))


def _same_pre(ours: dict, theirs: dict | None) -> bool:
    """Pre-tokenizers equal in what they do (``trim_offsets``, which only affects offsets, ignored)."""
    def core(node):
        if isinstance(node, dict):
            return {k: core(v) for k, v in node.items() if k not in ("trim_offsets",)}
        if isinstance(node, list):
            return [core(v) for v in node]
        return node
    return core(ours) == core(theirs)
