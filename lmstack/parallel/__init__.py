"""Distributed training on torch.distributed: DDP, ZeRO-1/2/3 (FSDP2), tensor and pipeline parallelism as
transforms over the plain model, composed by ``parallelize`` (see docs/parallel.md).

Names are imported on first use, so ``lmstack.parallel.config`` (plain data, a recipe's ``parallel:``
section) loads without torch.
"""

from lmstack.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "config": ["ParallelConfig"],
    "launch": ["DistributedError", "World", "init_distributed", "launched", "shutdown"],
    "plan": ["Parallelized", "parallelize"],
})
