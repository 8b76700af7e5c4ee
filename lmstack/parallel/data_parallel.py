"""Data parallelism: every rank trains on its slice of each batch and the gradients are averaged.

    ddp    DistributedDataParallel: full replicas; gradients all-reduced in buckets during backward.
           Per rank: params 4P + grads 4P + Adam 8P bytes (fp32), as one process.
    zero1  DDP + ZeroRedundancyOptimizer: each rank keeps the Adam state of (and updates) a 1/N share of the
           parameters, then broadcasts them. Per rank: 4P + 4P + 8P/N.
    zero2  FSDP2 (fully_shard) with reshard_after_forward=False: gradients reduce-scattered, parameters
           and Adam state sharded, parameters kept gathered from forward to backward. 4P/N + 4P/N + 8P/N at
           rest, the gathered parameters while a step runs.
    zero3  FSDP2 (fully_shard): every block's parameters are all-gathered just before its forward and its
           backward and freed after (the ZeRO-3 of Rajbhandari et al.). 16P/N at rest.

FSDP2 wraps each block, then the root (embedding, final norm, LM head), so one block's parameters are
gathered at a time; parameters become DTensors sharded on dim 0 over the data-parallel mesh dimension.
"""

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from lmstack.nn.checkpointing import blocks


class TrainingView(nn.Module):
    """What the objective calls: ``forward`` of the wrapped module (DDP's, so its gradient hooks run), and
    the model's ``config`` (so an objective still sees, e.g., a mixture of experts' router settings).

    It has no ``hidden_states``: a sharded or wrapped model is only run through ``forward``, whose hooks
    gather and synchronise what it needs."""

    def __init__(self, module: nn.Module, config) -> None:
        super().__init__()
        self.module = module
        self.config = config

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)


class HiddenStatesView(TrainingView):
    """A TrainingView that also has ``hidden_states`` (the wrapper's forward with ``return_hidden=True``) and
    the model's LM head, so the objective fuses head and loss (``linear_cross_entropy``) as in one process
    instead of holding (B, T, V) logits. Only for a head that is a whole matrix on every rank when the
    objective reads it (DDP, ZeRO-1; FSDP2, whose root parameters stay gathered from forward to backward)."""

    def __init__(self, module: nn.Module, model: nn.Module) -> None:
        super().__init__(module, model.config)
        self._model = (model,)  # in a tuple: not registered as a second path to the same parameters

    @property
    def lm_head(self) -> nn.Module:
        """The model's head as it is now (a transform applied later, e.g. LoRA on the head, is seen)."""
        return self._model[0].lm_head

    def hidden_states(self, *args, **kwargs):
        return self.module(*args, return_hidden=True, **kwargs)


def apply_ddp(model: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """``model`` wrapped in DistributedDataParallel over the 1-D data-parallel ``mesh``."""
    device = next(model.parameters()).device
    return DistributedDataParallel(model, process_group=mesh.get_group(),
                                   device_ids=[device.index] if device.type == "cuda" else None)


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2 over ``mesh`` (the data-parallel dimension, possibly of a 2-D mesh with tensor parallelism):
    each block of ``model.layers`` is one shard group, the root the rest. In place; returns ``model``."""
    for block in blocks(model):
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    # The root (embeddings, final norm, LM head) is left to FSDP's default: gathered from forward to backward
    # (backward needs it first). The objective's fused head + loss reads the head's weight after forward.
    fully_shard(model, mesh=mesh)
    return model


def zero1_optimizer(param_groups: list[dict], mesh: DeviceMesh, **adamw) -> ZeroRedundancyOptimizer:
    """AdamW whose state is split over the data-parallel ranks by parameter (ZeRO stage 1)."""
    return ZeroRedundancyOptimizer(param_groups, optimizer_class=torch.optim.AdamW, process_group=mesh.get_group(),
                                   **adamw)
