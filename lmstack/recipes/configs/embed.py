"""What `lmstack embed` takes."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import field


@dataclass
class EmbedConfig:
    """Embed texts with an encoder checkpoint (e.g. all-MiniLM-L6-v2) and print vectors or similarities."""

    texts: list[str] = field(help="texts to embed", positional=True)
    model: Path = field(help="encoder checkpoint directory (config.json, safetensors, vocab), or "
                        "all-minilm-l6-v2 (the bundled package)")
    output: Literal["similarity", "vectors"] = field("similarity", help="what to print")
    pooling: Literal["auto", "mean", "cls", "max"] = field("auto", help="pooling; auto reads the checkpoint's")
    batch_size: int = field(32, help="texts per forward pass")
    device: str = field("cpu", help="cpu, cuda, ...")
