"""GGUF import: llama.cpp's single-file format -> an lmstack model, its tokenizer and its chat template.

A GGUF file (parsed by ``gguf_reader``) holds key/value metadata (architecture sizes, the tokenizer's tokens / merges / token types,
the chat template) and tensors, many of them block-quantised. Loading:

    read_gguf (a memory-mapped parse of the container; errors name the file)
      -> hf_config_from_gguf: metadata -> the Hugging Face config.json the same model would have
      -> the family's config_from_hf -> build on the meta device
      -> every tensor dequantised (gguf_quants) and renamed; llama q/k rows un-permuted (llama.cpp's
         converter interleaves RoPE halves; transformers undoes it the same way); GPT-2's fused qkv split
      -> names and shapes checked against the model -> load_state_dict(assign=True)

The tokenizer becomes a tokenizer.json object (``gguf_tokenizer_json``) that ``lmstack.tokenizers`` loads
like any other: byte-level BPE ("gpt2" models) with the pre-tokenizer that ``tokenizer.ggml.pre`` names.
Architectures: llama (SmolLM2 included), mistral, qwen2, gpt2.
"""

import functools
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from lmstack.checkpoints.gguf_quants import SUPPORTED, dequantize
from lmstack.checkpoints.gguf_reader import parse_gguf
from lmstack.checkpoints.hf import report_non_finite, resolve_dtype, tied_aliases
from lmstack.errors import CheckpointError, ConfigError
from lmstack.models.registry import FAMILIES
from lmstack.nn.memory import hugepage_tensors, hugepages_available

ARCHITECTURES = ("llama", "mistral", "qwen2", "gpt2")


@dataclass
class GGUFTensor:
    """One stored tensor: its GGML type name, logical shape (rows first, as torch) and raw data."""

    name: str
    kind: str
    shape: tuple[int, ...]
    data: np.ndarray

    def dequantize_into(self, out: torch.Tensor) -> torch.Tensor:
        """Dequantise straight into ``out`` (contiguous float32 CPU, this tensor's shape): no temporary."""
        if tuple(out.shape) != self.shape or out.dtype != torch.float32 or not out.is_contiguous():
            raise CheckpointError(f"tensor {self.name!r} of shape {list(self.shape)} cannot fill "
                                  f"{list(out.shape)} {out.dtype}")
        dequantize(self.data, self.kind, out.numel(), out=out.numpy().reshape(-1))
        return out

    def to_torch(self) -> torch.Tensor:
        n = int(np.prod(self.shape)) if self.shape else 1
        values = dequantize(self.data, self.kind, n).reshape(self.shape)
        # F32 data is a view of the read-only file mapping; loading copies it (and torch would warn)
        return torch.from_numpy(values if values.flags.writeable else values.copy())


@dataclass
class GGUFFile:
    """A parsed GGUF file: metadata (key -> Python value) and tensors by name."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor]

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "")

    def get(self, key: str, default: Any = None) -> Any:
        """``{architecture}.{key}`` from the metadata."""
        return self.metadata.get(f"{self.architecture}.{key}", default)


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """Parse ``path`` (memory-mapped; tensor data is read only when dequantised).

    Raises:
        CheckpointError: missing, truncated or corrupted file, or a tensor type lmstack cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    metadata, entries = parse_gguf(path)
    tensors = {}
    for name, kind, shape, data in entries:
        if kind not in SUPPORTED:
            raise CheckpointError(f"{path}: tensor {name!r} has type {kind}, which lmstack cannot read "
                                  f"(supported: {', '.join(SUPPORTED)})")
        tensors[name] = GGUFTensor(name, kind, shape, data)
    return GGUFFile(path, metadata, tensors)


# --- config ---------------------------------------------------------------------------------------------

def hf_config_from_gguf(file: GGUFFile) -> dict[str, Any]:
    """The Hugging Face config.json of the model in ``file`` (what transformers derives from the metadata).

    Raises:
        ConfigError: an architecture lmstack does not support, or metadata it cannot express.
    """
    arch = file.architecture
    if arch not in ARCHITECTURES:
        raise ConfigError(f"{file.path}: GGUF architecture {arch!r} is not supported (supported: "
                          f"{', '.join(ARCHITECTURES)})")
    if "rope_freqs.weight" in file.tensors:
        raise ConfigError(f"{file.path}: rope_freqs.weight (llama3-style RoPE frequency factors) is not supported")
    kv_heads = file.get("attention.head_count_kv", file.get("attention.head_count"))
    if isinstance(kv_heads, list):
        if len(set(kv_heads)) != 1:
            raise ConfigError(f"{file.path}: per-layer key/value head counts {kv_heads} are not supported")
        kv_heads = kv_heads[0]
    tokens = file.metadata.get("tokenizer.ggml.tokens") or []
    embedding = file.tensors.get("token_embd.weight")
    vocab = file.get("vocab_size") or len(tokens) or (embedding.shape[0] if embedding is not None else None)
    specials = {name: file.metadata.get(f"tokenizer.ggml.{key}") for name, key in
                (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"), ("pad_token_id", "padding_token_id"))}
    tied = "output.weight" not in file.tensors
    stored = 1 + max((int(name.split(".")[1]) for name in file.tensors if name.startswith("blk.")
                      and name.split(".")[1].isdigit()), default=-1)
    if isinstance(file.get("block_count"), int) and file.get("block_count") > stored:
        raise ConfigError(f"{file.path}: the metadata says {file.get('block_count')} blocks, but the file holds "
                          f"tensors for {stored}")
    required = {"block_count", "embedding_length", "attention.head_count"}
    missing = sorted(k for k in required if file.get(k) is None)
    if missing:
        raise ConfigError(f"{file.path}: GGUF metadata lacks {', '.join(f'{arch}.{k}' for k in missing)}")
    if arch == "gpt2":
        return {"model_type": "gpt2", "vocab_size": vocab, "n_positions": file.get("context_length", 1024),
                "n_embd": file.get("embedding_length"), "n_layer": file.get("block_count"),
                "n_head": file.get("attention.head_count"), "n_inner": file.get("feed_forward_length"),
                "layer_norm_epsilon": file.get("attention.layer_norm_epsilon", 1e-5),
                "tie_word_embeddings": tied, "resid_pdrop": 0.0, **specials}
    dim, heads = file.get("embedding_length"), file.get("attention.head_count")
    # llama.cpp writes Mistral models as "llama"; like transformers, the name tells them apart.
    model_type = "mistral" if arch == "llama" and "mistral" in str(file.metadata.get("general.name", "")).lower() \
        else arch
    config = {"model_type": model_type, "vocab_size": vocab, "hidden_size": dim,
              "intermediate_size": file.get("feed_forward_length"), "num_hidden_layers": file.get("block_count"),
              "num_attention_heads": heads, "num_key_value_heads": kv_heads,
              "max_position_embeddings": file.get("context_length"),
              "rms_norm_eps": file.get("attention.layer_norm_rms_epsilon", 1e-6),
              "rope_theta": file.get("rope.freq_base", 10000.0), "tie_word_embeddings": tied, **specials}
    head_dim = file.get("attention.key_length") or dim // heads
    rotary = file.get("rope.dimension_count")
    if rotary is not None and rotary != head_dim:
        raise ConfigError(f"{file.path}: rope.dimension_count={rotary} differs from the head size {head_dim} "
                          "(partial rotary embeddings are not supported)")
    config["head_dim"] = head_dim
    config.update(_rope_scaling(file))
    if arch == "qwen2":
        config["use_sliding_window"] = False
    if model_type == "mistral":
        config["sliding_window"] = file.get("attention.sliding_window", 4096)  # MistralConfig's default
    return config


def _rope_scaling(file: GGUFFile) -> dict[str, Any]:
    kind = file.get("rope.scaling.type")
    if kind in (None, "none"):
        return {}
    if kind not in ("linear", "yarn"):
        raise ConfigError(f"{file.path}: rope.scaling.type {kind!r} is not supported (linear, yarn)")
    scaling = {"rope_type": kind, "factor": float(file.get("rope.scaling.factor", 1.0))}
    if kind == "yarn":
        scaling["original_max_position_embeddings"] = file.get("rope.scaling.original_context_length")
    return {"rope_scaling": scaling}


# --- tensors --------------------------------------------------------------------------------------------

_LLAMA_NAMES = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
                "output.weight": "lm_head.weight"}
_LLAMA_BLOCK = {"attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "mlp_norm.weight",
                **{f"attn_{g}.{k}": f"attn.{o}_proj.{k}" for g, o in (("q", "q"), ("k", "k"), ("v", "v"),
                                                                      ("output", "o")) for k in ("weight", "bias")},
                **{f"ffn_{p}.weight": f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}}
_GPT2_NAMES = {"token_embd.weight": "embed_tokens.weight", "position_embd.weight": "embed_positions.weight",
               "output_norm.weight": "norm.weight", "output_norm.bias": "norm.bias", "output.weight": "lm_head.weight"}
_GPT2_BLOCK = {"attn_norm.weight": "attn_norm.weight", "attn_norm.bias": "attn_norm.bias",
               "attn_output.weight": "attn.o_proj.weight", "attn_output.bias": "attn.o_proj.bias",
               "ffn_norm.weight": "mlp_norm.weight", "ffn_norm.bias": "mlp_norm.bias",
               "ffn_up.weight": "mlp.fc_in.weight", "ffn_up.bias": "mlp.fc_in.bias",
               "ffn_down.weight": "mlp.fc_out.weight", "ffn_down.bias": "mlp.fc_out.bias"}


def unpermute_rope_rows(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k permutation: per head, rows [r0, r(d/2), r1, r(d/2+1), ...] back to the halves
    layout that rotate-half RoPE expects (transformers' ``_reverse_permute_weights``)."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


def gguf_tensor_plan(file: GGUFFile, config) -> dict[str, list[tuple[str, Callable]]]:
    """GGUF tensor name -> [(our name, function from its dequantised values to ours)].

    Raises:
        CheckpointError: a tensor the architecture does not have.
    """
    arch, plan = file.architecture, {}
    names, block = (_GPT2_NAMES, _GPT2_BLOCK) if arch == "gpt2" else (_LLAMA_NAMES, _LLAMA_BLOCK)
    for name in file.tensors:
        if name in names:
            plan[name] = [(names[name], _same)]
            continue
        parts = name.split(".", 2)
        if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit():
            prefix, rest = f"layers.{parts[1]}.", parts[2]
            if arch == "gpt2" and rest in ("attn_qkv.weight", "attn_qkv.bias"):
                kind = rest.split(".")[1]
                plan[name] = [(f"{prefix}attn.{p}_proj.{kind}", functools.partial(_third, i)) for i, p in enumerate("qkv")]
                continue
            if rest in block:
                heads = {"attn_q": config.n_heads, "attn_k": config.n_kv_heads}.get(rest.split(".")[0])
                fix = functools.partial(unpermute_rope_rows, n_heads=heads) if arch == "llama" and heads else _same
                plan[name] = [(prefix + block[rest], fix)]
                continue
        raise CheckpointError(f"{file.path}: tensor {name!r} has no place in a {arch} model")
    return plan


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _third(i: int, t: torch.Tensor) -> torch.Tensor:
    """GPT-2's fused qkv (3C, ...) in nn.Linear layout -> q, k or v."""
    return t.chunk(3, dim=0)[i]


def gguf_state_dict(file: GGUFFile, config, places: dict[str, torch.Tensor] | None = None,
                    check: Callable[[str, tuple[int, ...]], None] | None = None) -> dict[str, torch.Tensor]:
    """The model's state dict (our names, float32) from the GGUF tensors.

    With ``places`` (our name -> preallocated float32 CPU tensor), each value is written there: a tensor
    that needs no fix-up is dequantised straight into its place, the others (llama q/k, GPT-2's qkv) via
    a temporary. ``check(name, shape)`` validates each value before it is written. Without places, the
    remaining tensors are dequantised on torch's thread count, at most two per thread in flight.
    """
    state, plan, places = {}, gguf_tensor_plan(file, config), places or {}
    check = check or (lambda name, shape: None)
    pending: deque = deque()
    workers = max(1, torch.get_num_threads())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for source in [*plan, None]:
            if source is not None:
                targets = plan[source]
                if len(targets) == 1 and targets[0][1] is _same and targets[0][0] in places:
                    ours = targets[0][0]
                    check(ours, file.tensors[source].shape)
                    state[ours] = file.tensors[source].dequantize_into(places[ours])  # multi-threaded inside
                    continue
                pending.append((source, pool.submit(file.tensors[source].to_torch)))
            while pending and (source is None or len(pending) > 2 * workers):
                name, future = pending.popleft()
                value = future.result()
                for ours, fix in plan[name]:
                    fixed = fix(value)
                    check(ours, tuple(fixed.shape))
                    state[ours] = places[ours].copy_(fixed) if ours in places else fixed.contiguous()
    return state


def load_gguf(path: "str | os.PathLike | GGUFFile", *, device: str | torch.device = "cpu",
              dtype: str | torch.dtype = "auto") -> nn.Module:
    """Load a GGUF file (a path, or one ``read_gguf`` already parsed) into an lmstack model, dequantised to
    ``dtype``, in eval mode. On CPU in float32 the weights go straight into huge-page memory
    (``lmstack.nn.memory``), each tensor dequantised and placed before the next, so they are held once.

    Returns:
        The Decoder, with ``model.config`` mapped from the metadata (``model_type`` the HF family).
    Raises:
        CheckpointError: unreadable file, unsupported tensor type, or tensors that do not match the metadata.
        ConfigError: unsupported architecture or metadata.
    """
    file = path if isinstance(path, GGUFFile) else read_gguf(path)
    hf_config = hf_config_from_gguf(file)
    family = FAMILIES[hf_config["model_type"]]
    try:
        config = family.config_from_hf(hf_config)
    except ConfigError as error:
        raise ConfigError(f"{file.path}: {error}") from None
    model = family.build_empty(config)
    aliases = tied_aliases(model)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items() if name not in aliases}
    device = torch.device(device)
    target = resolve_dtype(dtype, device, torch.float32)
    places = {}
    if device.type == "cpu" and target == torch.float32:
        shapes = list(expected.values())
        made = hugepage_tensors(shapes) if hugepages_available() else [torch.empty(s) for s in shapes]
        places = dict(zip(expected, made))

    def check(name: str, shape: tuple[int, ...]) -> None:
        if name not in expected:
            raise CheckpointError(f"{file.path}: tensor for {name!r} has no place in this model")
        if tuple(shape) != expected[name]:
            raise CheckpointError(f"{file.path}: tensor for {name!r} has shape {list(shape)}, the metadata "
                                  f"implies {list(expected[name])}")

    state = gguf_state_dict(file, config, places, check)
    if not places:  # another device or dtype
        state = {name: value.to(device=device, dtype=target) for name, value in state.items()}
    missing = sorted(set(expected) - set(state))
    if missing:
        raise CheckpointError(f"{file.path}: missing tensors for {missing[:5]} that the metadata implies")
    report_non_finite(state, file.path)
    for alias, source in aliases.items():
        state[alias] = state[source]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    return model.eval()
