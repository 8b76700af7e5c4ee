"""Training: objectives, optimizer and schedule, and the one training loop.

Names are imported on first use, so ``lmstack.train.config`` (plain data) loads without torch.
"""

from lmstack.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "config": ["TrainConfig"],
    "objectives": ["IGNORE_INDEX", "CausalLMObjective", "causal_lm_loss", "evaluate_lm", "linear_cross_entropy",
                   "next_token_targets"],
    "optim": ["WarmupCosine", "build_optimizer", "param_groups", "warmup_cosine"],
    "trainer": ["Objective", "Trainer"],
})
