"""Pruning settings checked without torch (the command line validates them before loading anything), and the
record a pruned checkpoint carries in its config.json:

    "pruning_config": {"method": "wanda", "sparsity": 0.5, "pattern": null, "scope": "layer", ...,
                       "structured": {"heads_removed_per_group": 1, "channels_removed": 768, ...}}

Transformers ignores the key; ``lmstack finetune`` reads it to keep the zeros of an unstructured pruning
(``keep_masks_`` from the weights that are exactly zero) while it trains.
"""

from pathlib import Path

from lmstack.errors import CheckpointError, ConfigError
from lmstack.fileio import read_json_object, write_json

RECORD_KEY = "pruning_config"


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    """``sparsity`` if it is a fraction in [0, 1), else ConfigError naming ``what``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ConfigError(f"{what}={sparsity!r} must be a fraction in [0, 1)")
    return float(sparsity)


def parse_pattern(pattern: str | None) -> tuple[int, int] | None:
    """"N:M" -> (N, M): keep N weights of every M (None passes through).

    Raises:
        ConfigError: not two integers "N:M", or N outside 1 .. M - 1.
    """
    if pattern is None:
        return None
    parts = str(pattern).split(":")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ConfigError(f"pattern={pattern!r} must be 'N:M' (keep N of every M weights), e.g. '2:4'")
    n, m = int(parts[0]), int(parts[1])
    if not 1 <= n < m:
        raise ConfigError(f"pattern={pattern!r}: N must be at least 1 and less than M (N={n}, M={m})")
    return n, m


def write_pruning_record(directory: Path, record: dict) -> None:
    """Add ``record`` to ``directory``/config.json (atomically) as its ``pruning_config``."""
    config = Path(directory) / "config.json"
    data = read_json_object(config, CheckpointError)
    data[RECORD_KEY] = record
    write_json(config, data)


def read_pruning_record(directory: Path) -> dict | None:
    """The ``pruning_config`` of a checkpoint directory's config.json, or None (not pruned, or not a directory)."""
    config = Path(directory) / "config.json"
    if not config.is_file():
        return None
    record = read_json_object(config, CheckpointError).get(RECORD_KEY)
    if record is not None and not isinstance(record, dict):
        raise CheckpointError(f"{config}: {RECORD_KEY} must be a JSON object, got {type(record).__name__}")
    return record


def keeps_zeros(record: dict | None) -> bool:
    """Whether a checkpoint's pruning zeroed single weights (whose zeros fine-tuning must keep)."""
    return bool(record) and record.get("method") not in (None, "none")
