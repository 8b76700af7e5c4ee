"""`lmstack convert SRC DST`: rewrite a Hugging Face-format checkpoint (dtype, shard size).

Conversions from other formats (GGUF, ...) arrive with later issues as further ``--from`` choices.
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import field
from lmstack.models import load_hf, save_hf


@dataclass
class ConvertConfig:
    """Read a checkpoint and write it again in Hugging Face format, optionally cast and re-sharded."""

    source: Path = field(help="input checkpoint directory", positional=True)
    output: Path = field(help="output directory (created; other files in it are kept)", positional=True)
    source_format: Literal["hf"] = field("hf", help="format of the input")
    dtype: Literal["stored", "float32", "bfloat16", "float16"] = field("stored", help="dtype of the written weights")
    max_shard_size: str = field("5GB", help="largest safetensors file before sharding, e.g. 2GB or 500MB")


def run(cfg: ConvertConfig) -> Path:
    model = load_hf(cfg.source, dtype="stored")
    out = save_hf(model, cfg.output, max_shard_size=cfg.max_shard_size, dtype=None if cfg.dtype == "stored" else cfg.dtype)
    print(f"wrote {out} ({sum(p.numel() for p in model.parameters()):,} parameters, {cfg.dtype})")
    return out
