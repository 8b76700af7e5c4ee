"""Training checkpoints: the trained weights plus the state that resumes the run exactly.

    RUN/checkpoints/step-0000200/
        config.json, model.safetensors     a plain model's weights (``load_hf`` / ``lmstack generate`` read them)
        trainable.safetensors              or, for a transformed model (LoRA, QLoRA, IA3, ...): only the
                                           parameters that train, by state-dict name (an adapter of a few MB,
                                           not the whole base); resumed into the live transformed model.
                                           A composite of models (PPO's policy + value) is saved this way too
        train_state.pt                     optimizer, scheduler, RNG states, data position, step
        (plus whatever ``extra_files`` adds: the tokenizer, the resolved run config, a peft adapter)

A checkpoint is written in full to a hidden temporary directory and renamed into place, so a run
killed at any moment leaves either the new checkpoint or none — never a damaged one — and older
checkpoints are pruned only after the new one exists. ``train_state.pt`` holds tensors and plain
Python values only and is read with ``torch.load(weights_only=True)``: nothing is unpickled.
"""

import os
import re
import shutil
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lmstack.checkpoints.hf import load_hf, save_hf
from lmstack.checkpoints.io import load_tensors, read_safetensors_header, write_safetensors
from lmstack.errors import CheckpointError, ConfigError
from lmstack.nn.transforms import transformed_modules

STATE_FILE = "train_state.pt"
TRAINABLE_FILE = "trainable.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m[1]), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(run_dir)
    return dirs[-1] if dirs else None


def save_checkpoint(run_dir: Path, step: int, model: nn.Module, train_state: dict, *, keep: int = 2,
                    extra_files: Callable[[Path], None] | None = None) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` checkpoints.

    Args:
        model: an lmstack model: saved with ``save_hf`` if plain, as its trainable parameters if transformed
            (``trainable_state``) or a composite of models without one config (PPO's ``PolicyAndValue``).
        train_state: tensors and plain values (optimizer/scheduler state dicts, RNG states, ...).
        extra_files: called with the temporary directory to add files (tokenizer, config) before the rename.
    Returns:
        The checkpoint directory.
    """
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-step-{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if transformed_modules(model) or not hasattr(model, "config"):
            tmp.mkdir(parents=True)
            write_safetensors(tmp / TRAINABLE_FILE, trainable_state(model), metadata={"format": "pt"})
        else:
            save_hf(model, tmp)
        torch.save(train_state, tmp / STATE_FILE)
        if extra_files is not None:
            extra_files(tmp)
        fsync_files(tmp)
        move_into_place(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for stale in checkpoint_dirs(run_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def move_into_place(tmp: Path, final: Path) -> None:
    """Rename the finished ``tmp`` to ``final``; re-saving a step (e.g. after resuming at it) swaps the old one
    out first and deletes it only after, so a checkpoint is never missing."""
    if final.exists():
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """State-dict name -> tensor for every parameter that trains (requires_grad), tied ones once."""
    seen, state = set(), {}
    for name, param in model.named_parameters():
        if param.requires_grad and id(param) not in seen:
            seen.add(id(param))
            state[name] = param.detach()
    return state


def fsync_files(directory: Path) -> None:
    """Flush every file under ``directory`` to disk before a rename makes the checkpoint visible (power loss,
    not just kills)."""
    for path in Path(directory).rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def load_checkpoint(checkpoint: Path, model: nn.Module) -> dict:
    """Copy the checkpoint's weights into ``model`` (in place) and return its train state.

    Raises:
        CheckpointError: missing or corrupted files, or weights that do not fit ``model``; the message
            names the checkpoint and suggests the previous one.
    """
    checkpoint = Path(checkpoint)
    hint = (f"; delete {checkpoint} to resume from the checkpoint before it, or start a new run without --resume")
    try:
        if (checkpoint / TRAINABLE_FILE).is_file():
            _load_trainable(checkpoint / TRAINABLE_FILE, model, hint)
        else:
            _load_plain(checkpoint, model, hint)
        state = torch.load(checkpoint / STATE_FILE, map_location="cpu", weights_only=True)
    except FileNotFoundError as error:
        raise CheckpointError(f"checkpoint {checkpoint} is incomplete ({error}){hint}") from None
    except (CheckpointError, ConfigError) as error:
        raise CheckpointError(f"checkpoint {checkpoint} cannot be loaded: {error}{hint}") from None
    except Exception as error:  # torch.load of a truncated/garbled file raises RuntimeError, pickle errors, ...
        raise CheckpointError(f"checkpoint {checkpoint}: {STATE_FILE} is corrupted ({error}){hint}") from None
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"checkpoint {checkpoint}: {STATE_FILE} holds no training state{hint}")
    return state


def _load_plain(checkpoint: Path, model: nn.Module, hint: str) -> None:
    saved = load_hf(checkpoint)
    ours, theirs = model.state_dict(), saved.state_dict()
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        raise CheckpointError(f"checkpoint {checkpoint} holds a different model architecture than the run's "
                              f"config (vocabulary or sizes changed?){hint}")
    with torch.no_grad():
        for name, tensor in ours.items():
            tensor.copy_(theirs[name])


def _load_trainable(path: Path, model: nn.Module, hint: str) -> None:
    """Copy a transformed model's trained parameters back: the same names and shapes as the live model's."""
    ours = trainable_state(model)
    stored = read_safetensors_header(path)
    if set(stored) != set(ours) or any(tuple(stored[n].shape) != tuple(ours[n].shape) for n in ours):
        differ = sorted(set(stored) ^ set(ours))[:4]
        raise CheckpointError(f"{path} holds other trainable parameters than this run's model ({differ or 'shapes'}: "
                              f"another adapter, rank or target?){hint}")
    with torch.no_grad():
        for name, tensor in load_tensors(path, list(stored)):
            ours[name].copy_(tensor)
