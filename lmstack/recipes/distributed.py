"""What a training recipe does differently under ``torchrun``, in one place for every job (pretrain,
finetune --task causal_lm, sft):

    torchrun --nproc-per-node 4 -m lmstack pretrain --config configs/pretrain/tiny.yaml --out runs/tiny \\
        --parallel.tp 2 --parallel.strategy zero3

``with distributed(cfg.parallel) as job:`` joins the launch (or, without torchrun, is one plain process and
changes nothing). Inside it:
- ``job.main_first(prepare)``: rank 0 prepares what every rank shares (the run directory, a trained
  tokenizer, token shards), then the others run ``prepare`` and find rank 0's files; an error on rank 0
  stops every rank with its message (no rank waits for a collective that never comes).
- ``job.parallelize(model, seed)`` / ``job.shard(data)``: the plan and this rank's slice of every batch.
- ``job.trained_model(model, rebuild, run_dir)``: the trained plain model on rank 0, for export (replicas are the
  model itself; sharded layouts are read back from the run's final sharded checkpoint into ``rebuild()``).
Only rank 0 prints: the other ranks' standard output is silenced for the job (errors still reach stderr).
"""

import contextlib
import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Iterator, TypeVar

import torch
from torch import nn

from lmstack.errors import ConfigError, LmstackError
from lmstack.parallel.config import ParallelConfig

T = TypeVar("T")


@dataclasses.dataclass
class Job:
    """A recipe's view of its launch: ``world`` is None in one plain process."""

    config: ParallelConfig
    world: object = None  # lmstack.parallel.World
    plan: object = None  # lmstack.parallel.Parallelized, once parallelize() ran

    @property
    def is_main(self) -> bool:
        return self.world is None or self.world.is_main

    def device(self, name: str) -> torch.device:
        """This rank's device under torchrun (its GPU, or the CPU with gloo), else ``train.device``'s."""
        from lmstack.train.trainer import resolve_device
        return resolve_device(name) if self.world is None else self.world.device

    def describe(self) -> str:
        """The launch for a recipe's start-up line: '' in one process, else e.g.
        '; 4 ranks: pp 1 x dp 2 x tp 2, zero3'."""
        if self.world is None:
            return ""
        pp, dp, tp = self.config.degrees(self.world.world_size)
        return f"; {self.world.world_size} ranks: pp {pp} x dp {dp} x tp {tp}, {self.config.strategy}"

    def main_first(self, prepare: Callable[[bool], T]) -> T:
        """``prepare(True)`` on rank 0, then ``prepare(False)`` on the other ranks (which reuse its files).
        An error rank 0 reports (a ``LmstackError``, or an ``OSError``: a file it cannot read or write) is raised on
        every rank, with rank 0's message, instead of leaving them waiting for it."""
        if self.world is None:
            return prepare(True)
        result, failure, message = None, None, ""
        if self.is_main:
            try:
                result = prepare(True)
            except (LmstackError, OSError) as error:
                failure, message = error, json.dumps([type(error).__name__, str(error)])
        message = _broadcast_text(message, self.world.device)
        if failure is not None:
            raise failure
        if message:
            kind, text = json.loads(message)
            raise _error_class(kind)(f"rank 0 stopped: {text}")
        return result if self.is_main else prepare(False)

    def parallelize(self, model: nn.Module, seed: int, peft: bool = False):
        """The plan for ``model`` (None in one process). ``peft``: adapters train on replicas only (DDP or
        ZeRO-1 without tensor or pipeline parallelism), since their files are written from rank 0's model."""
        if self.world is None:
            return None
        if peft and (self.config.tp > 1 or self.config.pp > 1 or self.config.strategy not in ("ddp", "zero1")):
            raise ConfigError(f"a PEFT run trains its adapters on data-parallel replicas: use parallel.strategy "
                              f"ddp or zero1 with parallel.tp 1 and parallel.pp 1 (got strategy "
                              f"{self.config.strategy}, tp {self.config.tp}, pp {self.config.pp})")
        from lmstack.parallel import parallelize
        self.plan = parallelize(model, self.config, self.world, seed)
        return self.plan

    def shard(self, data):
        """This rank's slice of every batch of ``data`` (``data`` itself in one process)."""
        return data if self.plan is None else self.plan.shard_data(data)

    @property
    def replicated(self) -> bool:
        """Whether every rank's model holds all of the trained weights (one process, DDP, ZeRO-1)."""
        return self.plan is None or (self.plan.tp == 1 and self.plan.pp == 1
                                     and self.config.strategy in ("ddp", "zero1"))

    def trained_model(self, model: nn.Module, rebuild: Callable[[], nn.Module], run_dir: Path) -> nn.Module | None:
        """The trained weights in a plain module on rank 0 (None on the others): ``model`` itself when it is a
        replica, else ``rebuild()`` (the untrained model, built as before) filled from the run's latest sharded
        checkpoint (the Trainer saves one at the last step). Every rank must call it."""
        if self.world is None:
            return model
        import torch.distributed as dist

        from lmstack.checkpoints.sharded import load_sharded_weights
        from lmstack.checkpoints.train_state import latest_checkpoint
        dist.barrier()
        if not self.is_main:
            return None
        if self.replicated:
            return model
        return load_sharded_weights(latest_checkpoint(run_dir), rebuild()).eval()

    def barrier(self) -> None:
        if self.world is not None:
            import torch.distributed as dist
            dist.barrier()


@contextlib.contextmanager
def distributed(config: ParallelConfig) -> Iterator[Job]:
    """Join the ``torchrun`` launch this process belongs to for the job's duration (then leave it), or run as
    one process when there is none.

    Raises:
        ConfigError: parallel.* settings given without torchrun.
    """
    from lmstack.parallel.launch import init_distributed, launched, shutdown
    if not launched():
        changed = sorted(f.name for f in dataclasses.fields(config)
                         if getattr(config, f.name) != getattr(ParallelConfig(), f.name))
        if changed:
            raise ConfigError(f"parallel.{changed[0]} is set but this is one process; launch the job with "
                              "`torchrun --nproc-per-node N -m lmstack ...` to train on several ranks")
        yield Job(config)
        return
    import torch.distributed as dist
    joined = not dist.is_initialized()  # a caller that joined the group itself (several jobs in one launch) keeps it
    world = init_distributed(config.backend, config.timeout_s)
    try:
        with contextlib.ExitStack() as stack:
            if not world.is_main:
                stack.enter_context(contextlib.redirect_stdout(stack.enter_context(open(os.devnull, "w"))))
            yield Job(config, world)
    finally:
        if joined:
            shutdown()


def one_process_only(config: ParallelConfig, job: str) -> None:
    """Refuse a torchrun launch (or parallel.* settings) for a job that trains in one process only."""
    from lmstack.parallel.launch import launched
    if launched() or config != ParallelConfig():
        raise ConfigError(f"{job} trains in one process; distributed training (torchrun, parallel.*) covers "
                          "pretrain, finetune --task causal_lm and sft")


def _broadcast_text(text: str, device: torch.device) -> str:
    """Rank 0's ``text`` on every rank (UTF-8 bytes in tensors: nothing is unpickled)."""
    import torch.distributed as dist
    data = torch.tensor(list(text.encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([data.numel()], device=device)
    dist.broadcast(size, src=0)
    if dist.get_rank() != 0:
        data = torch.empty(int(size), dtype=torch.uint8, device=device)
    if int(size):
        dist.broadcast(data, src=0)
    return bytes(data.cpu().tolist()).decode()


def _error_class(name: str) -> type[LmstackError]:
    import lmstack.errors as errors
    found = getattr(errors, name, None)
    return found if isinstance(found, type) and issubclass(found, LmstackError) else LmstackError
