"""What a distributed run is told: `ParallelConfig`, the ``parallel:`` section of the training jobs' YAML.

Plain data, importable without torch (so ``--help`` and a bad flag answer at once). The world of
``torchrun`` processes is factored as ``pp x dp x tp`` (pipeline stages, data-parallel replicas or
shards, tensor-parallel ranks); ``dp: 0`` takes whatever is left of the world.
"""

from dataclasses import dataclass
from typing import Literal

from lmstack.config import field
from lmstack.errors import ConfigError

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")


@dataclass
class ParallelConfig:
    """How the model and the batch are spread over the ranks of a ``torchrun`` launch."""

    dp: int = field(0, help="data-parallel degree: ranks that each take a slice of every batch "
                    "(0: the world size / (tp * pp))")
    tp: int = field(1, help="tensor-parallel degree: ranks that split each layer's heads and MLP width, "
                    "and the vocabulary of the embedding and LM head")
    pp: int = field(1, help="pipeline-parallel degree: stages, each a contiguous run of the decoder's layers")
    strategy: Literal["ddp", "zero1", "zero2", "zero3"] = field(
        "ddp", help="data parallelism: ddp (replicas, gradients all-reduced), zero1 (DDP + optimizer state "
        "sharded), zero2 (FSDP2 keeping parameters gathered between forward and backward: gradients and "
        "optimizer state sharded), zero3 (FSDP2: parameters, gradients and optimizer state sharded)")
    pp_schedule: Literal["gpipe", "1f1b"] = field("1f1b", help="pipeline schedule: gpipe (all forwards, then "
                                                  "all backwards) or 1f1b (one forward, one backward)")
    microbatches: int = field(0, help="pipeline micro-batches per batch (0: 2 * pp); must divide the "
                              "per-replica batch")
    activation_checkpointing: bool = field(False, help="recompute each block's activations in backward")
    compile: bool = field(False, help="torch.compile each block (applied by the parallel plan)")
    backend: Literal["auto", "gloo", "nccl"] = field("auto", help="process-group backend (auto: nccl on CUDA, "
                                                     "gloo on CPU)")
    timeout_s: float = field(120.0, help="seconds a collective waits for a missing rank before every rank "
                             "stops with an error (no hang)")

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name} must be at least 1, got {getattr(self, name)}")
        if self.dp < 0 or self.microbatches < 0:
            raise ConfigError(f"parallel.dp and parallel.microbatches must be >= 0, got {self.dp}, {self.microbatches}")
        if not self.timeout_s > 0:
            raise ConfigError(f"parallel.timeout_s must be > 0, got {self.timeout_s}")

    def degrees(self, world_size: int) -> tuple[int, int, int]:
        """(pp, dp, tp) for ``world_size`` ranks.

        Raises:
            ConfigError: the world does not factor into pp x dp x tp.
        """
        fixed = self.tp * self.pp
        dp = self.dp or (world_size // fixed if world_size % fixed == 0 else 0)
        if dp < 1 or self.pp * dp * self.tp != world_size:
            raise ConfigError(f"the world of {world_size} rank(s) does not factor into parallel.pp={self.pp} x "
                              f"parallel.dp={self.dp or '?'} x parallel.tp={self.tp}; launch "
                              f"{self.pp * max(self.dp, 1) * self.tp} processes or change the degrees")
        return self.pp, dp, self.tp

