"""The run-directory rules every training job shares: one run per directory, resumed only as it was.

``prepare_run_dir`` refuses a directory that already holds checkpoints unless ``--resume`` is given; on
resume it compares the job's config with the one saved in the latest checkpoint and refuses any change
but how long and how often (``RESUMABLE_CHANGES``) and the distributed layout (``parallel.*``); the
directory's own path may differ (a run may be named by a relative path or have moved). It sweeps
temporaries a killed run left, then saves the resolved config as ``config.yaml``.
"""

from pathlib import Path
from typing import Any

from lmstack.checkpoints.train_state import checkpoint_dirs, latest_checkpoint
from lmstack.config import load_yaml, save_yaml, to_dict
from lmstack.errors import CheckpointError, ConfigError
from lmstack.fileio import output_directory, sweep_orphans

RESUMABLE_CHANGES = ("config", "resume", "out", "train.max_steps", "train.eval_every", "train.eval_batches",
                     "train.checkpoint_every", "train.keep_checkpoints", "train.progress", "train.compile")
# A distributed run may resume on another world size or layout (sharded checkpoints are re-sharded on load).
RESUMABLE_SECTIONS = ("parallel.",)


def prepare_run_dir(cfg: Any, saved_name: str) -> Path:
    """Create ``cfg.out`` for a new run, or check it for ``cfg.resume`` against the config the latest
    checkpoint saved as ``saved_name``; then save ``config.yaml``.

    Raises:
        ConfigError: no --out, --out naming a file or an unwritable place, checkpoints present without --resume, or a changed config on resume.
        CheckpointError: --resume without a checkpoint.
    """
    if cfg.out is None:
        raise ConfigError("--out is required (the run directory)")
    out = output_directory(cfg.out, "--out")
    if cfg.resume:
        latest = latest_checkpoint(out)
        if latest is None:
            raise CheckpointError(f"--resume: no checkpoint under {out / 'checkpoints'}")
        if (latest / saved_name).exists():
            check_resumable(cfg, latest / saved_name)
    elif checkpoint_dirs(out):
        raise ConfigError(f"{out} already holds checkpoints of a run: pass --resume to continue it, or choose "
                          f"another --out (nothing was overwritten)")
    out.mkdir(parents=True, exist_ok=True)
    sweep_orphans(out)  # e.g. a tokenized-data temporary of a killed run
    save_yaml(cfg, out / "config.yaml")
    return out


def check_resumable(cfg: Any, saved_path: Path) -> None:
    """Raise ConfigError if ``cfg`` differs from the saved config other than in RESUMABLE_CHANGES."""
    def flat(data: dict, prefix: str = "") -> dict:
        items = {}
        for key, value in data.items():
            items.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
        return items

    now, before = flat(to_dict(cfg)), flat(load_yaml(saved_path))
    changed = sorted(k for k in now.keys() | before.keys()
                     if now.get(k) != before.get(k) and k not in RESUMABLE_CHANGES
                     and not k.startswith(RESUMABLE_SECTIONS))
    if changed:
        detail = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
        raise ConfigError(f"--resume with a changed config ({detail}); only how long and how often may change")
