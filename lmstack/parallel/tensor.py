"""Tensor parallelism (Megatron-LM) as a transform: ``apply_tensor_parallel(model, tp_mesh)``.

The plan is data in the model registry (``Family.tp_plan``: module-name pattern -> style), so this file never
branches on a family's name. Styles, over ``tp`` ranks:

    colwise          nn.Linear split by output features: each rank computes a slice of the outputs
                     (q/k/v: a slice of the heads; gate/up: a slice of the MLP width)
    rowwise          nn.Linear split by input features; the partial outputs are summed (one all-reduce)
    split_heads      an Attention module: it now sees n_heads / tp query and n_kv_heads / tp key/value heads
    vocab_embedding  nn.Embedding split by vocabulary rows; each rank looks up the ids it holds, the rest
                     read 0, and the outputs are summed
    vocab_head       the LM head split by vocabulary rows; the logits stay sharded (a DTensor, Shard(-1)) for
                     the vocabulary-parallel cross-entropy of ``loss_parallel()`` (no rank gathers V logits)

Each rank computes attention for its heads and the MLP for its slice of the width: two all-reduces per layer
in the forward pass, two in the backward. Parameters become ``DTensor``s (``.full_tensor()`` gathers one).
"""

import fnmatch

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from lmstack.errors import ConfigError
from lmstack.models.registry import family_for_config
from lmstack.nn.attention import Attention


class _WaitedRowwiseParallel(RowwiseParallel):
    """RowwiseParallel whose output all-reduce is waited for before the output leaves the module.

    torch's own returns an ``AsyncCollectiveTensor`` (the all-reduce still in flight). Inside a layer that is
    what overlaps communication, but the embedding's output is the first compiled block's input, and
    AOTAutograd given that subclass returns a plain gradient where DTensor's backward needs a DTensor
    (``'Tensor' object has no attribute '_local_tensor'``, torch 2.13, with ``parallel.compile``).
    """

    @staticmethod
    def _prepare_output_fn(output_layouts, use_local_output, mod, outputs, device_mesh):
        if outputs.placements != output_layouts:
            outputs = outputs.redistribute(placements=output_layouts, async_op=False)
        return outputs.to_local() if use_local_output else outputs


_STYLES = {
    "colwise": lambda: ColwiseParallel(),
    "rowwise": lambda: RowwiseParallel(),
    "vocab_embedding": lambda: _WaitedRowwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
    "vocab_head": lambda: ColwiseParallel(output_layouts=Shard(-1), use_local_output=False),
}


def tensor_parallel_plan(model: nn.Module) -> tuple[tuple[str, str], ...]:
    """The registry's plan for ``model``'s family.

    Raises:
        ConfigError: the family has no plan (mixtures of experts, encoders).
    """
    config = getattr(model, "config", None)
    family = family_for_config(config) if config is not None else None
    if family is None or not family.tp_plan:
        name = family.model_type if family is not None else type(model).__name__
        raise ConfigError(f"tensor parallelism has no plan for {name} models (their experts or encoder blocks are "
                          "not split); use parallel.tp 1 with data parallelism (ddp or zero1/2/3) instead")
    return family.tp_plan


def check_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Refuse, naming the size, a model whose heads, KV heads, MLP width or vocabulary ``tp`` does not divide."""
    config = model.config
    sizes = {"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "ffn_dim": config.ffn_dim,
             "vocab_size": config.vocab_size}
    for name, size in sizes.items():
        if size % tp:
            raise ConfigError(f"parallel.tp={tp} does not divide the model's {name}={size}: each tensor-parallel "
                              f"rank must hold a whole share of it (pick a tp that divides {size})")


def apply_tensor_parallel(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Split ``model``'s layers over the ranks of the 1-D ``mesh`` by its family's plan, in place.

    Returns:
        the model (same object; its parameters are now DTensors over ``mesh``).
    Raises:
        ConfigError: no plan for the family, or sizes ``mesh.size()`` does not divide.
    """
    plan = tensor_parallel_plan(model)
    tp = mesh.size()
    check_tensor_parallel(model, tp)
    tied = getattr(model.config, "tie_embeddings", False) and hasattr(model, "lm_head")
    modules = dict(model.named_modules())
    for pattern, style in plan:
        for name in fnmatch.filter(modules, pattern):
            if style == "split_heads":
                _split_heads(modules[name], tp)
            elif style in _STYLES:
                parallelize_module(modules[name], mesh, _STYLES[style]())
            else:
                raise ConfigError(f"unknown tensor-parallel style {style!r} for {pattern!r}; known: "
                                  f"{sorted(_STYLES) + ['split_heads']}")
    if tied:  # both were split by vocabulary rows the same way: share the one DTensor again
        model.lm_head.weight = model.embed_tokens.weight
    return model


def uses_loss_parallel(model: nn.Module) -> bool:
    """Whether the model's logits come out vocabulary-sharded (a ``vocab_head`` in its plan was applied)."""
    head = getattr(model, "lm_head", None)
    return head is not None and type(head.weight).__name__ == "DTensor"


def _split_heads(attention: nn.Module, tp: int) -> None:
    if not isinstance(attention, Attention):
        raise ConfigError(f"the tensor-parallel style split_heads needs an Attention module, got "
                          f"{type(attention).__name__}")
    attention.n_heads //= tp
    attention.n_kv_heads //= tp


def local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank stores of ``tensor`` (its local shard for a DTensor)."""
    return tensor.to_local().numel() if hasattr(tensor, "to_local") else tensor.numel()
