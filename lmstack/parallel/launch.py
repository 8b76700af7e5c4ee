"""Joining a ``torchrun`` launch: the process group, this process's device, and clear errors when a peer dies.

    torchrun --nproc-per-node 4 -m lmstack pretrain --config ... --parallel.tp 2

``torchrun`` sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; without them the job runs as one
plain process (``launched()`` is False). Collectives wait at most ``parallel.timeout_s`` for a missing rank;
a rank that died (or stopped with an error) makes every other rank raise ``DistributedError`` naming the
failure, instead of hanging, and ``torchrun`` stops the rest of the launch.
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator

import torch
import torch.distributed as dist

from lmstack.errors import ConfigError, LmstackError


class DistributedError(LmstackError):
    """A collective failed: another rank stopped, crashed or did not answer within parallel.timeout_s."""


@dataclass(frozen=True)
class World:
    """This process's place in the launch."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that logs, shows progress and writes the files every rank shares."""
        return self.rank == 0


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or anything setting its environment)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_distributed(backend: str = "auto", timeout_s: float = 120.0) -> World:
    """Join the process group of a ``torchrun`` launch (once) and pick this rank's device.

    Args:
        backend: "auto" (NCCL when CUDA is available, else gloo), "gloo" or "nccl".
        timeout_s: how long a collective waits for a missing rank before raising.
    Raises:
        ConfigError: not launched by torchrun, or NCCL asked for without CUDA.
    """
    if not launched():
        raise ConfigError("a parallel run needs the environment of `torchrun --nproc-per-node N -m lmstack ...` "
                          "(RANK and WORLD_SIZE are not set)")
    cuda = torch.cuda.is_available()
    backend = ("nccl" if cuda else "gloo") if backend == "auto" else backend
    if backend == "nccl" and not cuda:
        raise ConfigError("parallel.backend='nccl' needs CUDA; use gloo on CPU")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    device = torch.device("cuda", local_rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), local_rank, device)


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def peer_failures(rank: int) -> Iterator[None]:
    """Turn the error a collective raises when a peer is gone into a ``DistributedError`` that says so."""
    try:
        yield
    except (dist.DistError, RuntimeError) as error:
        if isinstance(error, LmstackError) or not _is_peer_failure(error):
            raise
        first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
        raise DistributedError(f"rank {rank}: a collective with the other ranks failed ({first}); another rank "
                               "stopped, crashed or did not answer within parallel.timeout_s. Resume the run from "
                               "its last checkpoint with --resume") from None


def _is_peer_failure(error: BaseException) -> bool:
    if isinstance(error, dist.DistError):
        return True
    text = str(error).lower()
    return any(s in text for s in ("gloo", "nccl", "connection", "timed out", "timeout", "peer"))
