"""Optimizer and learning-rate schedule: AdamW with decay / no-decay groups, linear warmup + cosine decay."""

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: matrices and embeddings (dim >= 2) decay; biases and norm scales (dim < 2) do not,
    since shrinking them toward zero only fights the normalisation. Tied parameters appear once."""
    params = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                    eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused kernel where the device has one (CPU and CUDA in torch >= 2.4)."""
    device = next(model.parameters()).device.type
    fused = device in ("cpu", "cuda")
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, fused=fused)


def warmup_cosine(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """LR multiplier at ``step``: linear from 1/warmup to 1 over warmup_steps, then cosine down to
    min_ratio at max_steps (and min_ratio after)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step >= max_steps:
        return min_ratio
    progress = (step - warmup_steps) / max(1, max_steps - warmup_steps)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """``warmup_cosine`` as a scheduler (its state_dict holds the step, so it resumes exactly)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int, min_ratio: float) -> None:
        self.warmup_steps, self.max_steps, self.min_ratio = warmup_steps, max_steps, min_ratio
        super().__init__(optimizer, self._multiplier)

    def _multiplier(self, step: int) -> float:
        return warmup_cosine(step, self.warmup_steps, self.max_steps, self.min_ratio)
