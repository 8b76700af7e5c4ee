"""The ``peft`` section of `lmstack finetune` (plain data, no torch: `lmstack finetune --help` stays fast)."""

from dataclasses import dataclass
from typing import Literal

from lmstack.config import field
from lmstack.errors import ConfigError

METHODS = ("none", "lora", "dora", "qlora", "ia3")


@dataclass
class PeftSection:
    """Parameter-efficient fine-tuning: which method, and its settings."""

    method: Literal["none", "lora", "dora", "qlora", "ia3"] = field(
        "none", help="none (full fine-tuning), lora, dora, qlora (LoRA over an NF4 base) or ia3")
    rank: int = field(8, help="LoRA / DoRA / QLoRA rank r")
    alpha: float = field(16.0, help="LoRA scale numerator: the update is (alpha / r) B A")
    dropout: float = field(0.0, help="dropout on the LoRA branch's input")
    rslora: bool = field(False, help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    targets: list[str] | None = field(None, help="module names to adapt (default: the model family's)")
    merge: bool = field(True, help="also export the merged model (a plain Hugging Face checkpoint) beside the adapter")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"peft.rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"peft.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
