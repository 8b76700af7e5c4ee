"""Alignment losses as pure functions of log-probabilities, rewards and masks (no models, no data).

Shapes: B pairs (or sequences), T completion positions. Every function is the formula of its paper in
the form trl 1.16 computes it (tested equal, 1e-5, in tests/parity/test_trl_parity.py); where trl made a
choice the paper does not (IPO's per-token normalisation, GRPO's k3 KL times the ratio), that choice is
named in the docstring.
"""

import torch
import torch.nn.functional as F

PAIRWISE_LOSSES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo")


def dpo_loss(chosen_logps: torch.Tensor, rejected_logps: torch.Tensor, ref_chosen_logps: torch.Tensor,
             ref_rejected_logps: torch.Tensor, *, beta: float, loss_type: str = "sigmoid",
             label_smoothing: float = 0.0, chosen_lengths: torch.Tensor | None = None,
             rejected_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO and its reference-based variants over summed completion log-probs, each (B,).

    With Δ = (log π(c) − log π_ref(c)) − (log π(r) − log π_ref(r)):
        sigmoid  −(1−ε)·log σ(βΔ) − ε·log σ(−βΔ)        (DPO; ε > 0 is conservative DPO)
        hinge    max(0, 1 − βΔ)                           (SLiC)
        ipo      (Δc/|c| − Δr/|r| − 1/(2β))²              (IPO, per-token normalised as trl does)
        robust   (−(1−ε)·log σ(βΔ) + ε·log σ(−βΔ)) / (1−2ε)   (robust DPO under label noise ε)
    Returns (mean loss, {"chosen_rewards", "rejected_rewards"} = β·log-ratios, detached).
    """
    chosen_ratio, rejected_ratio = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("the IPO loss needs the completion lengths")
        delta = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        losses = (delta - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(beta * delta)
                  + label_smoothing * F.logsigmoid(-beta * delta)) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; expected sigmoid, hinge, ipo or robust")
    return losses.mean(), {"chosen_rewards": beta * chosen_ratio.detach(),
                           "rejected_rewards": beta * rejected_ratio.detach()}


def simpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, *, beta: float, gamma: float,
               label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SimPO (no reference model): −log σ(β·(avg log π(c) − avg log π(r)) − γ), average per-token log-probs (B,)."""
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = -(1 - label_smoothing) * F.logsigmoid(logits) - label_smoothing * F.logsigmoid(-logits)
    return losses.mean(), {"chosen_rewards": beta * chosen_avg_logps.detach(),
                           "rejected_rewards": beta * rejected_avg_logps.detach()}


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − exp(x)) for x < 0 (ORPO's log-odds)."""
    return torch.log1p(-torch.exp(x))


def orpo_loss(chosen_avg_logps: torch.Tensor, rejected_avg_logps: torch.Tensor, chosen_nll: torch.Tensor, *,
              beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ORPO (no reference model): NLL of the chosen sequences − β·mean log σ(log odds(c) − log odds(r)),
    odds(y) = p/(1−p) with p the average per-token probability (B,); ``chosen_nll`` a scalar."""
    log_odds = (chosen_avg_logps - rejected_avg_logps) - (log1mexp(chosen_avg_logps) - log1mexp(rejected_avg_logps))
    ratio = F.logsigmoid(log_odds)
    return chosen_nll - beta * ratio.mean(), {"chosen_rewards": beta * chosen_avg_logps.detach(),
                                              "rejected_rewards": beta * rejected_avg_logps.detach(),
                                              "log_odds_ratio": ratio.detach().mean()}


def kto_loss(logps: torch.Tensor, ref_logps: torch.Tensor, desirable: torch.Tensor, kl_logps: torch.Tensor,
             ref_kl_logps: torch.Tensor, *, beta: float, desirable_weight: float = 1.0,
             undesirable_weight: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KTO over unpaired completions (B,), ``desirable`` bool (B,).

    z = mean(log π − log π_ref) over mismatched (prompt, other completion) rows, clamped at 0 and detached;
    desirable rows lose 1 − σ(β(Δ − z)), undesirable rows 1 − σ(β(z − Δ)); the mean over all rows, each
    weighted by its kind (trl's order: desirable rows first)."""
    z = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    ratio = logps - ref_logps
    chosen, rejected = ratio[desirable], ratio[~desirable]
    losses = torch.cat([desirable_weight * (1 - torch.sigmoid(beta * (chosen - z))),
                        undesirable_weight * (1 - torch.sigmoid(beta * (z - rejected)))])
    return losses.mean(), {"chosen_rewards": beta * chosen.detach(), "rejected_rewards": beta * rejected.detach(),
                           "kl": z}


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: torch.Tensor | None = None, center_coefficient: float = 0.0) -> torch.Tensor:
    """Reward-model loss −log σ(r_c − r_r − margin), mean over pairs (B,); optionally + c·mean((r_c + r_r)²)
    to keep rewards centred at zero (trl's center_rewards_coefficient)."""
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coefficient:
        loss = loss + center_coefficient * ((chosen_rewards + rejected_rewards) ** 2).mean()
    return loss


def group_advantages(rewards: torch.Tensor, group_size: int, scale: bool = True) -> torch.Tensor:
    """GRPO: each completion's reward minus its group's mean, over the group's std (unbiased) + 1e-4.
    ``rewards`` (N,) with the G = group_size completions of each prompt adjacent."""
    grouped = rewards.view(-1, group_size)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (grouped.std(dim=1, keepdim=True) + 1e-4)
    return centred.flatten()


def grpo_loss(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, *,
              beta: float = 0.0, ref_logps: torch.Tensor | None = None, epsilon_low: float = 0.2,
              epsilon_high: float = 0.2, loss_type: str = "grpo",
              max_completion_length: int | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The clipped GRPO surrogate over per-token log-probs (N, T) with advantages (N,) and mask (N, T).

    per token: −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)·A) + β·k3·ρ, ρ = exp(log π − log π_old),
    k3 = exp(ref − log π) − (ref − log π) − 1 (times ρ: trl's bias-corrected KL estimate).
    Reduction (``loss_type``): grpo = mean over each sequence's tokens, then over sequences; bnpo / dapo =
    mean over all tokens of the batch; dr_grpo = sum / (N · max_completion_length).
    """
    ratio = torch.exp(logps - old_logps)
    adv = advantages[:, None]
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high) * adv)
    stats = {"clip_fraction": _masked_mean(((ratio < 1 - epsilon_low) | (ratio > 1 + epsilon_high)).float(), mask)}
    if beta:
        if ref_logps is None:
            raise ValueError("a KL penalty (beta > 0) needs the reference log-probs")
        diff = ref_logps - logps
        kl = (torch.exp(diff) - diff - 1) * ratio
        per_token = per_token + beta * kl
        stats["kl"] = _masked_mean(kl.detach(), mask)
    mask = mask.to(per_token.dtype)
    if loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type in ("bnpo", "dapo"):
        loss = (per_token * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token * mask).sum() / (per_token.shape[0] * (max_completion_length or per_token.shape[1]))
    else:
        raise ValueError(f"unknown GRPO loss {loss_type!r}; expected grpo, bnpo, dapo or dr_grpo")
    return loss, stats


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1)


# --- PPO (RLHF) ------------------------------------------------------------------------------------------

def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask`` is 1."""
    return _masked_mean(values, mask.to(values.dtype))


def masked_var(values: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance where ``mask`` is 1 (Bessel-corrected by default, as trl's)."""
    mask = mask.to(values.dtype)
    centred = values - masked_mean(values, mask)
    variance = masked_mean(centred**2, mask)
    if unbiased:
        n = mask.sum()
        variance = variance * n / (n - 1).clamp(min=1)
    return variance


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(values − mean)·rsqrt(var + 1e-8) over the masked entries (the mean added back if not ``shift_mean``)."""
    mean, var = masked_mean(values, mask), masked_var(values, mask)
    whitened = (values - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def ppo_rewards(logps: torch.Tensor, ref_logps: torch.Tensor, scores: torch.Tensor, last_index: torch.Tensor,
                kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards (N, T): −kl_coef·(log π − log π_ref) at every token, plus the sequence score at its
    last token ``last_index`` (N,). Returns (rewards, per-token KL)."""
    kl = logps - ref_logps
    rewards = -kl_coef * kl
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last_index] += scores
    return rewards, kl


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation backwards over T: δ_t = r_t + γV_{t+1} − V_t, A_t = δ_t + γλA_{t+1}
    (V and A are 0 past each sequence's end, given by ``mask`` (N, T)). Returns (advantages, returns = A + V)."""
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    advantages = torch.zeros_like(values)
    last = torch.zeros_like(values[:, 0])
    T = values.shape[1]
    for t in reversed(range(T)):
        next_value = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages[:, t] = last
    return advantages * mask, (advantages + values) * mask


def ppo_losses(logps: torch.Tensor, old_logps: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
               old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, *, clip_range: float = 0.2,
               clip_range_value: float = 0.2, value_mask: torch.Tensor | None = None,
               ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped policy loss mean(max(−Aρ, −A·clip(ρ, 1±ε))) over ``mask`` and clipped value loss
    0.5·mean(max((V − R)², (clip(V, V_old ± ε_v) − R)²)) over ``value_mask`` (default ``mask``), all (N, T).

    Stats: clip_fraction / value_clip_fraction, where the clipped term is the larger one (trl's definition),
    and the mean ratio ρ = exp(log π − log π_old)."""
    value_mask = mask if value_mask is None else value_mask
    ratio = torch.exp(logps - old_logps)
    pg_plain, pg_clipped = -advantages * ratio, -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    clipped_values = torch.clamp(values, old_values - clip_range_value, old_values + clip_range_value)
    vf_plain, vf_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    stats = {"clip_fraction": masked_mean((pg_clipped > pg_plain).float(), mask),
             "value_clip_fraction": masked_mean((vf_clipped > vf_plain).float(), value_mask),
             "ratio": masked_mean(ratio.detach(), mask)}
    return (masked_mean(torch.max(pg_plain, pg_clipped), mask),
            0.5 * masked_mean(torch.max(vf_plain, vf_clipped), value_mask), stats)
