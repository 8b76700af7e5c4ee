"""Per-token log-probabilities of given tokens under a model: what every preference and RL loss is built on.

Token t of a row is predicted from position t - 1, so scores come out (B, T - 1), aligned with
``input_ids[:, 1:]``. Only the scored positions go through the LM head: a DPO batch scores its completions,
not its prompts, and the (positions x vocabulary) logits of the rest are never computed.
"""

import torch
from torch import nn


def token_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                scored: torch.Tensor, position_ids: torch.Tensor | None = None,
                with_entropy: bool = False, temperature: float = 1.0) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """log p(input_ids[:, t] | tokens < t) where ``scored[:, t]`` is 1, else 0.

    Args:
        input_ids: (B, T); attention_mask: (B, T) or None; position_ids: (B, T) or None.
        scored: (B, T) 0/1, which tokens to score (a completion mask); column 0 is never scored.
        with_entropy: also return the entropy of the predicted distribution at the scored positions.
        temperature: score under softmax(logits / temperature), the distribution a sampler at that
            temperature drew from (RL ratios must compare like with like).
    Returns:
        (B, T - 1) log-probs (0 where not scored), and with ``with_entropy`` the (B, T - 1) entropies.
    """
    keep = scored[:, 1:].bool()
    if hasattr(model, "hidden_states") and hasattr(model, "lm_head"):
        hidden = model.hidden_states(input_ids, attention_mask, position_ids)[:, :-1]
        logits = model.lm_head(hidden[keep]).float()  # (N, V): the scored positions only
    else:  # any other causal LM: the full logits
        logits = model(input_ids, attention_mask, position_ids)[:, :-1][keep].float()
    if temperature != 1.0:
        logits = logits / temperature
    targets = input_ids[:, 1:][keep]
    log_norm = logits.logsumexp(-1)
    picked = logits.gather(-1, targets[:, None]).squeeze(-1) - log_norm
    out = torch.zeros(keep.shape, dtype=picked.dtype, device=picked.device)
    out = out.masked_scatter(keep, picked)
    if not with_entropy:
        return out
    with torch.no_grad():
        probs = torch.softmax(logits, -1)
        entropy = log_norm - (probs * logits).sum(-1)
    return out, torch.zeros_like(out).masked_scatter(keep, entropy)


def sequence_logps(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of each row's completion log-probs: (B,) summed log-prob and (B,) scored tokens."""
    per_token = token_logps(model, input_ids, attention_mask, completion_mask)
    return per_token.sum(-1), completion_mask[:, 1:].sum(-1).to(per_token.dtype)
