"""The ``peft`` section of `lmstack finetune` (plain data, no torch: `lmstack finetune --help` stays fast)."""

from dataclasses import dataclass
from typing import Literal

from lmstack.config import field
from lmstack.errors import ConfigError

METHODS = ("none", "lora", "dora", "qlora", "ia3", "adapter", "prefix", "prompt")
# Methods whose learned part cannot be folded into the weights: they export the adapter alone.
UNMERGEABLE = ("adapter", "prefix", "prompt")


@dataclass
class PeftSection:
    """Parameter-efficient fine-tuning: which method, and its settings."""

    method: Literal["none", "lora", "dora", "qlora", "ia3", "adapter", "prefix", "prompt"] = field(
        "none", help="none (full fine-tuning), lora, dora, qlora (LoRA over an NF4 base), ia3, adapter (Houlsby "
                     "bottleneck adapters), prefix (prefix tuning) or prompt (prompt tuning)")
    rank: int = field(8, help="LoRA / DoRA / QLoRA rank r")
    alpha: float = field(16.0, help="LoRA scale numerator: the update is (alpha / r) B A")
    dropout: float = field(0.0, help="dropout on the LoRA branch's input")
    rslora: bool = field(False, help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    targets: list[str] | None = field(None, help="module names to adapt (default: the model family's; for adapter: "
                                                 "attn and mlp)")
    adapter_size: int = field(64, help="bottleneck adapter width m (C -> m -> C)")
    adapter_activation: str = field("relu", help="bottleneck adapter non-linearity: relu, gelu, silu or tanh")
    virtual_tokens: int = field(20, help="prefix / prompt tuning: number of virtual tokens P")
    prefix_projection: int | None = field(None, help="prefix tuning: width of the reparameterisation MLP "
                                                     "(default: none, the prefix is learned directly)")
    prompt_init_text: str | None = field(None, help="prompt tuning: start the soft prompt from this text's token "
                                                    "embeddings (default: tokens drawn from the vocabulary)")
    merge: bool | None = field(None, help="also export the merged model (a plain Hugging Face checkpoint) beside the "
                                          "adapter (default: yes for lora, dora, qlora and ia3; adapter, prefix and "
                                          "prompt cannot merge)")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ConfigError(f"peft.rank must be a positive integer, got {self.rank}")
        if not self.alpha > 0:
            raise ConfigError(f"peft.alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"peft.dropout must be in [0, 1), got {self.dropout}")
        if self.adapter_size < 1:
            raise ConfigError(f"peft.adapter_size must be a positive integer, got {self.adapter_size}")
        if self.virtual_tokens < 1:
            raise ConfigError(f"peft.virtual_tokens must be a positive integer, got {self.virtual_tokens}")
        if self.prefix_projection is not None and self.prefix_projection < 1:
            raise ConfigError(f"peft.prefix_projection must be a positive integer, got {self.prefix_projection}")
        if self.merge and self.method in UNMERGEABLE:
            raise ConfigError(f"peft.merge: {self.method} cannot be merged into the weights (it is not a change of "
                              f"them); it exports the adapter only")

    @property
    def exports_merged(self) -> bool:
        """Whether the run writes a merged Hugging Face model beside the adapter."""
        return self.method not in UNMERGEABLE and self.merge is not False
