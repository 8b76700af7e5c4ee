"""Training: objectives, optimizer and schedule, and the one training loop."""

from lmstack.train.objectives import (IGNORE_INDEX, CausalLMObjective, causal_lm_loss, linear_cross_entropy,
                                      next_token_targets)
from lmstack.train.optim import WarmupCosine, build_optimizer, param_groups, warmup_cosine
from lmstack.train.trainer import TrainConfig, Trainer, evaluate_lm

__all__ = ["CausalLMObjective", "IGNORE_INDEX", "TrainConfig", "Trainer", "WarmupCosine", "build_optimizer",
           "causal_lm_loss", "evaluate_lm", "linear_cross_entropy", "next_token_targets", "param_groups", "warmup_cosine"]
