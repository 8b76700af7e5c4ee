"""What `lmstack convert` takes."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import field


@dataclass
class ConvertConfig:
    """Write a checkpoint (HF directory or GGUF file) as a Hugging Face-format directory, or as a GGUF file."""

    source: Path = field(help="input: checkpoint directory, .gguf file, or a bundled name", positional=True)
    output: Path = field(help="output directory (created; other files in it are kept), or FILE.gguf for "
                              "llama.cpp", positional=True)
    dtype: Literal["stored", "float32", "bfloat16", "float16"] = field(
        "stored", help="dtype of the written weights (stored: as the source; a GGUF dequantises to float32)")
    max_shard_size: str = field("5GB", help="largest safetensors file before sharding, e.g. 2GB or 500MB")
    type: Literal["f32", "f16", "q8_0", "q4_0", "q4_1"] = field("f16", help="GGUF output: the matrices' tensor "
                                                                "type (norms and odd-sized rows stay f32)")
