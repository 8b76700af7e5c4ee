"""What `lmstack convert` takes."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import field


@dataclass
class ConvertConfig:
    """Write a checkpoint (HF directory or GGUF file) as a Hugging Face-format directory."""

    source: Path = field(help="input: checkpoint directory, .gguf file, or a bundled name", positional=True)
    output: Path = field(help="output directory (created; other files in it are kept)", positional=True)
    dtype: Literal["stored", "float32", "bfloat16", "float16"] = field(
        "stored", help="dtype of the written weights (stored: as the source; a GGUF dequantises to float32)")
    max_shard_size: str = field("5GB", help="largest safetensors file before sharding, e.g. 2GB or 500MB")
