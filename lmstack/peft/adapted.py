"""How a PEFT method attaches to a layer without renaming it: the layer's class is swapped for a subclass that
mixes the method in (``LoRALayer`` before ``nn.Linear``, ``QuantizedLinear``, ``SkinnyLinear``, ...).

Why not a wrapper (peft's ``base_layer``)? A wrapper moves ``q_proj.weight`` to ``q_proj.base_layer.weight``,
and every name map (Hugging Face files, quantized files, tensor-parallel plans) would need to know. Swapping
the class keeps the base module's own tensors, names and forward (``super().forward``), adds the method's
tensors beside them, and ``remove_`` swaps the plain class back.
"""

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.nn.transforms import TransformError

_CLASSES: dict[tuple[type, type], type] = {}


class PeftLayer:
    """Base of the mixins (``LoRALayer``, ``IA3Layer``): what a layer adapted by PEFT is."""

    transform_name = "peft"
    # The fused decoding step reads a layer's base weights only: an adapted layer must keep the model on the
    # eager path (fused_step_blocker treats a None ``decode_operands`` as "not a kernel layer").
    decode_operands = None


def adapted_class(mixin: type, base: type) -> type:
    """The class ``mixin`` + ``base`` (made once per pair, named e.g. ``LoRALinear``)."""
    key = (mixin, base)
    if key not in _CLASSES:
        _CLASSES[key] = type(f"{mixin.__name__.removesuffix('Layer')}{base.__name__}", (mixin, base),
                             {"__module__": mixin.__module__})
    return _CLASSES[key]


def adapt_(module: nn.Module, mixin: type) -> nn.Module:
    """Swap ``module``'s class for ``mixin`` over it (in place; returns the module)."""
    if isinstance(module, PeftLayer):
        raise ConfigError(f"{type(module).__name__} already carries a {module.transform_name} transform; "
                          f"remove it (lmstack.peft.remove_) before applying another")
    module.__class__ = adapted_class(mixin, type(module))
    return module


def base_class(module: nn.Module) -> type:
    """The class ``module`` had before ``adapt_``."""
    return next(c for c in type(module).__mro__ if not issubclass(c, PeftLayer))


def restore_(module: nn.Module) -> None:
    """Undo ``adapt_``: the base class back (the mixin's own attributes are deleted by the caller)."""
    module.__class__ = base_class(module)


def is_linear(module: nn.Module) -> bool:
    """A layer PEFT can adapt: nn.Linear and the layers standing in for it (SkinnyLinear, QuantizedLinear)."""
    return (not isinstance(module, PeftLayer) and hasattr(module, "in_features")
            and (isinstance(module, nn.Linear) or hasattr(module, "decode_operands")))


def linear_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> every linear layer of ``model``, adapted ones included, but not an adapter's own
    (``lora_A``, a bottleneck's ``adapter_down``, prefix tuning's MLP)."""
    found, owned = {}, []
    for name, module in model.named_modules():
        if any(name == root or name.startswith(root + ".") for root in owned):
            continue
        if isinstance(module, PeftLayer):
            owned += [f"{name}.{t.split('.')[0]}" if name else t.split(".")[0] for t in module.added_tensors()]
        if (isinstance(module, PeftLayer) and hasattr(module, "in_features")) or is_linear(module):
            found[name] = module
    return found


def base_weight(module: nn.Module) -> torch.Tensor:
    """The (out, in) fp32 weight the base layer multiplies by (a quantized layer's dequantised codes)."""
    dequantize = getattr(module, "dequantize", None)
    return dequantize() if dequantize is not None else module.weight


def require_plain_weight(layer: nn.Module, merged: str) -> None:
    """Refuse an in-place merge into a quantized base weight (``merged``: what the merged weight would be,
    "W + s B A"), naming the export that does it instead.

    Raises:
        TransformError: the layer's base has no fp32 ``weight`` to merge into.
    """
    if not isinstance(getattr(layer, "weight", None), torch.Tensor):
        raise TransformError(f"cannot merge {layer.transform_name} into a {base_class(layer).__name__} base in place: "
                             f"its weight is quantized (QLoRA's NF4 base, say). Export it merged instead: "
                             f"save_hf(model, path, dequantize=True) writes dequantised {merged} in fp32")


def weight_device(module: nn.Module) -> torch.device:
    """Where the base layer's tensors live (``meta`` for a model built to be loaded)."""
    tensor = getattr(module, "weight", None)
    if tensor is None:
        tensor = next(iter(module.buffers()))
    return tensor.device


def materialize_(module: nn.Module, device: torch.device) -> None:
    """Meta-device parameters of ``module`` (its own and its children's) replaced by uninitialised storage."""
    for name, param in list(module.named_parameters(recurse=False)):
        if param.is_meta:
            setattr(module, name, nn.Parameter(torch.empty_like(param, device=device), param.requires_grad))
    for child in module.children():
        materialize_(child, device)
