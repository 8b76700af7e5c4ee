"""What a training run is told: `TrainConfig`, the ``train:`` section of every training job's YAML.

Plain data, importable without torch (so `lmstack pretrain --help` and a bad flag answer at once).
"""

from dataclasses import dataclass
from typing import Literal

from lmstack.config import field
from lmstack.errors import ConfigError


@dataclass
class TrainConfig:
    """Optimisation, evaluation and checkpointing of a training run."""

    max_steps: int = field(1000, help="optimizer steps to train for")
    batch_size: int = field(16, help="sequences per micro-batch")
    grad_accum: int = field(1, help="micro-batches per optimizer step")
    lr: float = field(1e-3, help="peak learning rate")
    min_lr: float = field(1e-4, help="learning rate at the end of the cosine decay")
    warmup_steps: int = field(100, help="steps of linear warmup")
    weight_decay: float = field(0.1, help="AdamW weight decay (matrices and embeddings only)")
    beta1: float = field(0.9, help="AdamW beta1")
    beta2: float = field(0.95, help="AdamW beta2")
    grad_clip: float = field(1.0, help="clip the global gradient norm to this (0: no clipping)")
    eval_every: int = field(200, help="evaluate on held-out data every N steps (0: only at the end)")
    eval_batches: int = field(20, help="held-out batches per periodic evaluation")
    checkpoint_every: int = field(200, help="write a checkpoint every N steps (and always at the end)")
    keep_checkpoints: int = field(2, help="how many recent checkpoints to keep")
    compile: bool = field(False, help="torch.compile the model for training")
    precision: Literal["auto", "fp32", "bf16"] = field("auto", help="auto: bf16 autocast where the device "
                                                        "supports it (CUDA with bf16), fp32 otherwise")
    device: str = field("auto", help="auto (CUDA if available, else CPU), cpu, cuda, cuda:N")
    progress: bool = field(True, help="show a progress bar")

    def __post_init__(self) -> None:
        for name in ("max_steps", "batch_size", "grad_accum", "eval_batches", "keep_checkpoints", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0 or not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.lr must be > 0 and train.min_lr in [0, lr]; got lr={self.lr}, min_lr={self.min_lr}")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1):
            raise ConfigError(f"train.beta1/beta2 must be in [0, 1), got {self.beta1}, {self.beta2}")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("train.grad_clip and train.weight_decay must be >= 0")
