"""What the core knows of a transform (LoRA, DoRA, IA3, quantization, ...): the contract loading and saving use.

A transform rewrites a plain model in place (``apply_lora(model, ...)``, ``quantize_(model, ...)``). The
modules it leaves behind declare what they changed, so that checkpoint code never needs to know which
technique made them:

- ``transform_name`` (class attribute): "lora", "dora", "ia3", "int4 quantization", ... — named in errors.
- ``added_tensors()`` -> local state-dict names the transform added beside the base module's own
  (``["lora_A.weight", "lora_B.weight"]``). The base module's names are unchanged, so a base checkpoint
  plans and loads exactly as for the plain model.
- ``initialize_added_()`` (optional): give the added tensors their starting values once the base weights
  are loaded (a transform applied on the meta device holds only placeholders until then; DoRA's magnitude
  is the loaded weight's row norms).
- ``merged_state()`` (optional) -> the plain module's whole state (``{"weight": ..., "bias": ...}``) with the
  transform folded in, which a Hugging Face file can hold. A module without it cannot be merged:
  ``base_state_dict`` then refuses, naming the module and its transform. A quantized layer offers
  ``dequantized_state()`` instead, used only when asked (``save_hf(..., dequantize=True)``).

A transform callable used by ``load_model(path, transforms=[...])`` may set ``needs_weights = True`` (a
quantizer must see the real weights); the others run on the meta device before any weight is read.

A transform of the whole model (prefix / prompt tuning swap the model's own class) that keeps leading
KV-cache slots for itself declares ``reserved_cache_slots``: ``StaticKVCache.for_model`` adds them, so
callers size caches by their own tokens; it then masks and numbers those slots itself.
"""

from typing import Callable, Iterable

import torch
from torch import nn

from lmstack.errors import ConfigError

Transform = Callable[[nn.Module], "nn.Module | None"]


class TransformError(ConfigError):
    """A transformed model asked for something its transform cannot give (a merge, a plain save)."""


def transformed_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module, for every module a transform left (those declaring ``transform_name``)."""
    return {name: m for name, m in model.named_modules() if getattr(m, "transform_name", None) is not None}


def added_tensor_names(model: nn.Module) -> set[str]:
    """Qualified state-dict names that transforms added: the tensors a base checkpoint does not hold."""
    return {f"{name}.{local}" if name else local for name, module in transformed_modules(model).items()
            for local in module.added_tensors()}


def transform_names(model: nn.Module) -> list[str]:
    """The distinct transforms applied to ``model``, in module order ("lora", "int4 quantization", ...)."""
    return list(dict.fromkeys(m.transform_name for m in transformed_modules(model).values()))


def base_state_dict(model: nn.Module, *, merge: bool = True, dequantize: bool = False) -> dict[str, torch.Tensor]:
    """The state dict of the plain model ``model`` stands for: every transformed module's own tensors
    replaced by ``merged_state()`` (with ``merge``), or by ``dequantized_state()`` (a quantized layer, only
    with ``dequantize``: an fp32 file 4-8x the size the user may not expect).

    Raises:
        TransformError: a transformed module that cannot be merged (or ``merge=False`` with any transform),
            naming the module and its transform.
    """
    state = model.state_dict()
    for name, module in transformed_modules(model).items():
        merged = getattr(module, "merged_state", None)
        if merged is None and dequantize:
            merged = getattr(module, "dequantized_state", None)
        if not merge or merged is None:
            how = "" if merge else " (merge=False)"
            raise TransformError(f"{name} carries a {module.transform_name} transform that a plain checkpoint cannot "
                                 f"hold{how}: {getattr(module, 'save_hint', 'save it with the tool of that transform')}")
        prefix = f"{name}." if name else ""
        for local in module.state_dict():  # its own tensors and its adapters' (lora_A.weight, ...)
            state.pop(prefix + local, None)
        for local, tensor in merged().items():
            state[prefix + local] = tensor
    return state


def initialize_added_(model: nn.Module) -> None:
    """Give every transform's added tensors their starting values (after the base weights loaded)."""
    for module in transformed_modules(model).values():
        initialize = getattr(module, "initialize_added_", None)
        if initialize is not None:
            initialize()


def split_transforms(transforms: Iterable[Transform]) -> tuple[list[Transform], list[Transform]]:
    """(the leading transforms that can run on the meta device, the rest): a transform that needs real
    weights, and every one after it, runs once the weights are loaded, so the order given is kept."""
    transforms = list(transforms)
    cut = next((i for i, t in enumerate(transforms) if needs_weights(t)), len(transforms))
    return transforms[:cut], transforms[cut:]


def needs_weights(transform: Transform) -> bool:
    """The transform's ``needs_weights`` flag (or, for a ``functools.partial``, its function's)."""
    return bool(getattr(transform, "needs_weights", False) or getattr(getattr(transform, "func", None),
                                                                     "needs_weights", False))


def apply_transforms(model: nn.Module, transforms: Iterable[Transform]) -> nn.Module:
    """Run each transform on ``model`` in order (a transform may return a replacement model)."""
    for transform in transforms:
        result = transform(model)
        model = model if result is None else result
    return model
