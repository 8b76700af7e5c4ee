"""Activation checkpointing as a transform: ``checkpoint_layers_(model)`` makes each block of ``model.layers``
keep only its input during a training forward pass and recompute the rest in backward (one more forward
per step, in exchange for the activations of all but one block: what makes QLoRA fit).

The blocks keep their class, names and state (the class is swapped for a subclass whose ``forward`` runs the
original one under ``torch.utils.checkpoint``, non-reentrant, RNG state preserved so dropout replays the
same masks); outside training or without autograd they run as before.
"""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_CLASSES: dict[type, type] = {}


class CheckpointedBlock:
    """Mixed in before a block's class by ``checkpoint_layers_``."""

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():
            return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)
        return super().forward(*args, **kwargs)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks of ``model.layers``: a ModuleList, or the ModuleDict a pipeline stage keeps (by layer index)."""
    layers = getattr(model, "layers", None)
    if isinstance(layers, nn.ModuleDict):
        return list(layers.values())
    return list(layers) if isinstance(layers, nn.ModuleList) else []


def checkpoint_layers_(model: nn.Module) -> nn.Module:
    """Checkpoint every block in ``model.layers`` (and ``model.encoder.layers`` / ``decoder.layers``) in place."""
    for stack in (blocks(m) for m in (model, getattr(model, "encoder", None), getattr(model, "decoder", None))
                  if m is not None):
        for block in stack:
            base = type(block)
            if issubclass(base, CheckpointedBlock):
                continue
            if base not in _CLASSES:
                _CLASSES[base] = type(f"Checkpointed{base.__name__}", (CheckpointedBlock, base), {})
            block.__class__ = _CLASSES[base]
    return model
