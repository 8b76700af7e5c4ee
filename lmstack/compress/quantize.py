"""``quantize_(model, scheme)``: swap a model's linear layers for low-bit ``QuantizedLinear`` modules.

    from lmstack.compress import quantize_
    quantize_(model, "int4", group_size=128)          # round-to-nearest; the model stays a plain nn.Module
    quantize_(model, "gptq", calibration=batches)     # int4 codes chosen by GPTQ (lmstack.compress.calibrated)

Schemes: ``int8`` (per output row, symmetric; or per group), ``int4`` (per group, asymmetric), ``nf4`` (QLoRA's
NormalFloat4 with double-quantised block scales), and the calibrated int4 methods ``gptq`` and ``awq``.
``activations="int8"`` adds dynamic quantization of the inputs (per token, or per weight group) to the int8 and
int4 schemes: ``quantize_(model, "int8", activations="int8")`` is torchao's Int8DynamicActivationInt8Weight.
Every nn.Linear is swapped (SkinnyLinear too), the LM head included unless ``lm_head=False``. The token
embedding stays fp32 unless ``embedding=True`` (``QuantizedEmbedding``: the same formats, dequantising only
the rows a lookup reads). A head tied to the embedding is untied first when only the head is quantized
(it gets its own quantized copy; the head reads every row every step, the embedding one row per token);
with ``embedding=True`` the two share one quantized table, as in llama.cpp's files.
"""

import dataclasses
import fnmatch

import torch
from torch import nn

from lmstack.compress.quantized_embedding import QuantizedEmbedding
from lmstack.compress.quantized_linear import QuantizedLinear, check_activations, check_shape
from lmstack.errors import ConfigError
from lmstack.kernels.skinny_linear import SkinnyLinear

CALIBRATED = ("gptq", "awq")
ALL_SCHEMES = ("int8", "int4", "nf4", *CALIBRATED)


def quantization_targets(model: nn.Module, lm_head: bool = True, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Qualified name -> linear module, for every linear ``quantize_`` would swap."""
    found = {}
    for name, module in model.named_modules():
        if type(module) not in (nn.Linear, SkinnyLinear):
            continue
        if (name == "lm_head" and not lm_head) or any(fnmatch.fnmatch(name, pattern) for pattern in exclude):
            continue
        found[name] = module
    return found


def quantize_(model: nn.Module, scheme: str = "int8", *, group_size: int | None = None, lm_head: bool = True,
              exclude: tuple[str, ...] = (), calibration: list[torch.Tensor] | None = None,
              activations: str | None = None, embedding: bool = False, progress=None) -> nn.Module:
    """Quantize ``model``'s linears in place (returns ``model``). ``group_size``: inputs per scale (int4,
    gptq, awq: default 128; int8: default None, one scale per row); nf4 has its fixed blocks of 64.
    ``calibration``: token-id batches (B, T) for ``gptq`` / ``awq``; ``activations``: None (weight-only) or
    ``"int8"`` (dynamic, see the module docstring); ``embedding``: quantize the token embedding too (int4
    round-to-nearest for gptq / awq, which have no calibration for it; a tied head shares it);
    ``progress(done, total)`` is called after each layer.

    Raises:
        ConfigError: an unknown scheme, an unsupported group size, a layer width the scheme cannot store
            (naming the layer), a calibrated scheme without calibration data. Nothing is swapped then.
    """
    if scheme not in ALL_SCHEMES:
        raise ConfigError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(ALL_SCHEMES)}")
    targets = quantization_targets(model, lm_head, exclude)
    storage = "int4" if scheme in CALIBRATED else scheme
    group_size = None if storage == "nf4" else (group_size or 128) if storage == "int4" else group_size
    check_activations(storage, activations)
    shapes = {name: module.in_features for name, module in targets.items()}
    table = getattr(model, "embed_tokens", None)
    if embedding:
        if type(table) is not nn.Embedding:
            raise ConfigError(f"embedding=True needs an nn.Embedding named embed_tokens, found {type(table).__name__}")
        shapes["embed_tokens"] = table.embedding_dim
    for name, width in shapes.items():  # every shape is checked before anything is swapped
        try:
            check_shape(storage, width, group_size)
        except ConfigError as error:
            raise ConfigError(f"{name}: {error}") from None
    if scheme in CALIBRATED and not calibration:
        raise ConfigError(f"{scheme} needs calibration text (token batches)")
    tied = _tied(model)
    shared = embedding and "lm_head" in targets and tied
    if "lm_head" in targets or (embedding and tied):  # a fp32 head keeps the tied Parameter for itself
        _untie_head(model, copy="lm_head" in targets and not shared)
    if "lm_head" in targets:
        targets["lm_head"] = model.lm_head
    if scheme in CALIBRATED:
        from lmstack.compress.calibrated import calibrated_int4

        chosen = calibrated_int4(model, targets, scheme, group_size, calibration, progress)
    else:
        chosen = {}
    for i, (name, module) in enumerate(targets.items()):
        quantized = QuantizedLinear.from_linear(module, storage, group_size, tensors=chosen.get(name),
                                                activations=activations)
        _set_submodule(model, name, quantized)
        if progress is not None and scheme not in CALIBRATED:
            progress(i + 1, len(targets))
    if embedding:
        quantized_table = (QuantizedEmbedding.from_table(model.lm_head) if shared
                           else QuantizedEmbedding.from_embedding(table, storage, group_size))
        model.embed_tokens = quantized_table
    model.quantization = {"scheme": scheme, "group_size": group_size, "activations": activations,
                          "embedding": embedding, "lm_head": "lm_head" in targets, "exclude": list(exclude)}
    return model


quantize_.needs_weights = True  # as a load transform (lmstack.nn.transforms): it rounds the loaded weights


def _tied(model: nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "tie_embeddings", False))


def _untie_head(model: nn.Module, copy: bool = True) -> None:
    """Give the LM head its own weight (a copy, unless the embedding is about to share the head's quantized
    table) and record it in the config, so that nothing re-ties them."""
    if _tied(model):
        if copy:
            head = model.lm_head
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
        model.config = dataclasses.replace(model.config, tie_embeddings=False)


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (what a save writes, tied tensors once)."""
    seen, total = set(), 0
    for tensor in [*model.parameters(), *(b for n, b in model.named_buffers() if not _transient(model, n))]:
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            total += tensor.numel() * tensor.element_size()
    return total


def _transient(model: nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    return leaf in module._non_persistent_buffers_set
