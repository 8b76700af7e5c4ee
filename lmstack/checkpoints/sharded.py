"""Sharded training checkpoints of a distributed run, through ``torch.distributed.checkpoint`` (DCP).

    RUN/checkpoints/step-0000200/
        sharded/          DCP files: each rank writes the shards it holds (model and optimizer state, by
                          parameter name), nothing is gathered on one rank; ``.metadata`` says where every
                          piece of every tensor lives, so another world size or layout reads it back
                          (saved with FSDP on 4 ranks, resumed with DDP on 2 or in one process)
        train_state.pt    step, scheduler, data position, optimizer hyper-parameters (rank 0; the same on all)
        rank-00003.pt     each rank's RNG states (bitwise resume at the same world size)
        layout.json       the world size and parallel layout it was saved with
        (plus extra files from rank 0: the tokenizer, the run config)

Every rank writes into one hidden temporary directory (named after rank 0's process id); after a barrier
rank 0 renames it into place, so a run killed at any moment leaves either the whole checkpoint or none.

Safety: DCP's ``.metadata`` is a pickle, read here by an unpickler that only builds DCP's own metadata
classes, torch sizes, dtypes and layouts (``SafeFileSystemReader``); DCP items here are tensors only (the optimizer's
hyper-parameters go to ``train_state.pt``), so no other pickled value is ever read, and the ``.pt`` files are
read with ``torch.load(weights_only=True)``.
"""

import io
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch import nn

from lmstack.checkpoints.train_state import STATE_FILE, checkpoint_dirs, fsync_files, move_into_place
from lmstack.errors import CheckpointError

SHARDED_DIR = "sharded"
LAYOUT_FILE = "layout.json"
_FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def is_sharded(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was written by ``save_sharded_checkpoint``."""
    return (Path(checkpoint) / SHARDED_DIR / ".metadata").is_file()


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only what DCP's metadata holds: its own dataclasses, torch.Size, dtypes and plain containers."""

    _TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
    _BUILTINS = {"set", "frozenset", "slice", "complex", "tuple", "list", "dict"}

    def find_class(self, module: str, name: str):
        allowed = (module.startswith("torch.distributed.checkpoint.")
                   or (module == "torch" and (name == "Size"
                                              or isinstance(getattr(torch, name, None), self._TORCH_VALUES)))
                   or (module == "torch.serialization" and name == "_get_layout")
                   or (module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath", "WindowsPath"))
                   or (module == "collections" and name == "OrderedDict")
                   or (module == "builtins" and name in self._BUILTINS))
        if not allowed:
            raise CheckpointError(f"the checkpoint metadata refers to {module}.{name}, which DCP metadata never "
                                  "holds: refusing to load it (the file is not a checkpoint written by lmstack)")
        return super().find_class(module, name)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with a metadata unpickler restricted to DCP's own classes."""

    def read_metadata(self, *args, **kwargs):
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            try:
                metadata = _MetadataUnpickler(f).load()
            except (pickle.UnpicklingError, EOFError, AttributeError, ValueError) as error:
                raise CheckpointError(f"{path} is corrupted ({error})") from None
        if getattr(metadata, "storage_meta", None) is not None:
            metadata.storage_meta.load_id = self.load_id
        return metadata


class _TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        raise CheckpointError(f"the checkpoint stores {read_item.dest_index.fqn} as a pickled object; lmstack "
                              "checkpoints hold tensors only, refusing to unpickle it")


def stored_tensors(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    """Name -> full (unsharded) shape of every tensor in a sharded checkpoint (read on each rank, no collective)."""
    metadata = SafeFileSystemReader(Path(checkpoint) / SHARDED_DIR).read_metadata()
    return {name: tuple(meta.size) for name, meta in metadata.state_dict_metadata.items() if hasattr(meta, "size")}


def state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """This rank's model and optimizer-state tensors by parameter name (shards as DTensors), as a sharded
    checkpoint stores them: ``model.<name>`` and ``optim.state.<name>.<key>`` whatever the strategy (a plain
    module, DDP, FSDP2, tensor-parallel, a pipeline stage, ZeRO-1). The optimizer's hyper-parameters are not
    tensors and come from the run's config. The optimizer's state is created (zeros) if it has none yet."""
    model = get_model_state_dict(module)
    if isinstance(optimizer, ZeroRedundancyOptimizer):  # the parameters this rank updates
        optim = _zero1_state(module, optimizer)
    else:
        optim = get_optimizer_state_dict(module, optimizer, options=_FLAT)
    return {**{f"model.{k}": v for k, v in model.items()},
            **{f"optim.{k}": v for k, v in optim.items() if k.startswith("state.")}}


def load_state_tensors(module: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` (from ``state_tensors``, filled from a checkpoint) back into the module and optimizer."""
    set_model_state_dict(module, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        return  # _zero1_state handed out the live state tensors: loading filled them in place
    live = get_optimizer_state_dict(module, optimizer, options=_FLAT)
    live.update({k[len("optim."):]: v for k, v in tensors.items() if k.startswith("optim.")})
    set_optimizer_state_dict(module, optimizer, live, options=_FLAT)


def _zero1_state(module: nn.Module, optimizer: ZeroRedundancyOptimizer) -> dict[str, torch.Tensor]:
    """The flattened AdamW state of the parameters this rank owns under ZeRO-1 (the names FSDP's and DDP's
    checkpoints use, so either reads it), created as zeros where a parameter has none yet."""
    names = {id(p): n for n, p in module.named_parameters()}
    local, out = optimizer.optim, {}
    for group in local.param_groups:
        for p in group["params"]:
            state = local.state[p]
            if not state:
                state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
            for key, value in state.items():
                out[f"state.{names[id(p)]}.{key}"] = value
    return out


def load_sharded_weights(checkpoint: Path, model: nn.Module) -> nn.Module:
    """Read a sharded checkpoint's weights into a plain (one-process) ``model``, in place: how rank 0 exports
    the Hugging Face folder, or a one-process job reads a distributed run's checkpoint."""
    checkpoint = Path(checkpoint)
    wanted = {f"model.{k}": v for k, v in model.state_dict().items()}
    _check_fits(checkpoint, stored_tensors(checkpoint), wanted, "")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(wanted, checkpoint_id=checkpoint / SHARDED_DIR, planner=_TensorsOnlyLoadPlanner(), no_dist=True,
                 storage_reader=SafeFileSystemReader(checkpoint / SHARDED_DIR))
    return model


def save_sharded_checkpoint(run_dir: Path, step: int, tensors: dict[str, torch.Tensor], train_state: dict,
                            rank_state: dict, layout: dict, *, keep: int = 2,
                            extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` from every rank (a collective: all ranks call it with their own shards).

    Args:
        tensors: name -> tensor or DTensor this rank holds (model and flattened optimizer state).
        train_state: rank-independent state (rank 0 writes it); rank_state: this rank's (RNG states).
        layout: the world size and degrees, recorded in layout.json.
    Returns:
        The checkpoint directory.
    """
    rank, distributed = _rank()
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    token = [os.getpid()]
    if distributed:
        dist.broadcast_object_list(token, src=0)
    tmp = root / f".tmp-step-{step:07d}-{token[0]}"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier(distributed)
    try:
        dcp.save(tensors, checkpoint_id=str(tmp / SHARDED_DIR))
        torch.save(rank_state, tmp / f"rank-{rank:05d}.pt")
        if rank == 0:
            torch.save(train_state, tmp / STATE_FILE)
            (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=2) + "\n", encoding="utf-8")
            if extra_files is not None:
                extra_files(tmp)
        _barrier(distributed)
        if rank == 0:
            fsync_files(tmp)
            move_into_place(tmp, final)
            for stale in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
                shutil.rmtree(stale, ignore_errors=True)
        _barrier(distributed)
    finally:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_sharded_checkpoint(checkpoint: Path, tensors: dict[str, torch.Tensor]) -> tuple[dict, dict | None]:
    """Fill ``tensors`` (this rank's shards, by name) in place from ``checkpoint``; return (train state, this
    rank's saved state or None when the checkpoint had fewer ranks).

    Raises:
        CheckpointError: files missing, or tensors the checkpoint does not hold or holds in another shape
            (another model); raised on every rank before any collective, so none is left waiting.
    """
    checkpoint = Path(checkpoint)
    hint = f"; delete {checkpoint} to resume from the checkpoint before it, or start a new run without --resume"
    try:
        stored = stored_tensors(checkpoint)
        train_state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete ({error}){hint}") from None
    _check_fits(checkpoint, stored, tensors, hint)
    with warnings.catch_warnings():  # one process reading a distributed run's checkpoint is intended
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(tensors, checkpoint_id=checkpoint / SHARDED_DIR, planner=_TensorsOnlyLoadPlanner(),
                 storage_reader=SafeFileSystemReader(checkpoint / SHARDED_DIR))
    rank, _ = _rank()
    own = checkpoint / f"rank-{rank:05d}.pt"
    rank_state = torch.load(own, map_location="cpu", weights_only=True) if own.is_file() else None
    return train_state, rank_state


def _check_fits(checkpoint: Path, stored: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor],
                hint: str) -> None:
    """Refuse ``tensors`` the checkpoint lacks or holds in another full shape (a DTensor's shape is its global one)."""
    missing = sorted(set(tensors) - set(stored))
    wrong = sorted(n for n in tensors if n in stored and tuple(tensors[n].shape) != stored[n])
    if missing or wrong:
        raise CheckpointError(f"checkpoint {checkpoint} holds another model: missing {missing[:3]}, other shapes "
                              f"{wrong[:3]} (a different architecture, vocabulary or optimizer){hint}")


def _rank() -> tuple[int, bool]:
    distributed = dist.is_available() and dist.is_initialized()
    return (dist.get_rank() if distributed else 0), distributed


def _barrier(distributed: bool) -> None:
    if distributed:
        dist.barrier()
