"""What `lmstack info` takes."""

from dataclasses import dataclass
from pathlib import Path

from lmstack.config import field


@dataclass
class InfoConfig:
    """Describe a checkpoint: family, parameter count, dtype, context length, per-module parameters."""

    path: Path = field(help="checkpoint directory (config.json + *.safetensors), a .gguf file, or a bundled "
                            "name (smollm2-135m-instruct, all-minilm-l6-v2)", positional=True)
    check_weights: bool = field(True, help="read every weight once to report tensors holding NaN or inf "
                                           "(--no-check-weights: metadata only, instant)")
