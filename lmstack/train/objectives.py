"""Training objectives: ``objective(model, batch) -> (loss, metrics)``; adding one never touches the loop.

Causal LM with teacher forcing: the model reads tokens 0..T-1 and is scored on predicting tokens 1..T.
Targets equal to IGNORE_INDEX (padding, prompt tokens) are left out of the mean.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def next_token_targets(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Targets for teacher forcing from unshifted ids: targets[:, t] = input_ids[:, t + 1]; the last
    position and positions whose next token is padding get IGNORE_INDEX. (B, T) -> (B, T)."""
    targets = torch.full_like(input_ids, IGNORE_INDEX)
    targets[:, :-1] = input_ids[:, 1:]
    if attention_mask is not None:
        targets[:, :-1] = targets[:, :-1].masked_fill(attention_mask[:, 1:] == 0, IGNORE_INDEX)
    return targets


def causal_lm_loss(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits (B, T, V) against next-token targets (B, T), in fp32, ignoring IGNORE_INDEX.

    reduction "mean" (over scored tokens) or "sum" (nats, for exact averages across batches)."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                           reduction=reduction)


class CausalLMObjective:
    """Next-token prediction on (inputs, targets) batches (B, T) from ``lmstack.data``."""

    def __call__(self, model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        inputs, targets = batch
        loss = causal_lm_loss(model(inputs), targets)
        return loss, {"tokens": int((targets != IGNORE_INDEX).sum())}
