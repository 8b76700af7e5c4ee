"""Distributed training on torch.distributed: DDP, ZeRO-1/2/3 (FSDP2), tensor and pipeline parallelism as
transforms over the plain model, composed by ``parallelize`` (see docs/parallel.md)."""

from lmstack.parallel.config import ParallelConfig
from lmstack.parallel.launch import DistributedError, World, init_distributed, launched, shutdown
from lmstack.parallel.plan import Parallelized, parallelize

__all__ = ["DistributedError", "ParallelConfig", "Parallelized", "World", "init_distributed", "launched",
           "parallelize", "shutdown"]
