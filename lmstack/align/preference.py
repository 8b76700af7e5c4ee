"""Preference objectives: DPO (sigmoid, hinge, IPO, robust), SimPO, ORPO over chosen/rejected pairs, and KTO
over unpaired good/bad completions, on the Trainer's ``objective(model, batch)`` protocol.

A pair batch (``lmstack.data.preference``) is (2B, T): the B chosen rows, then the B rejected rows, each
prompt + completion + EOS, with ``completion_mask`` marking the completion. The reference model's
log-probs come from one of three places (``Reference``): a frozen copy, the policy itself with its
adapters switched off (LoRA / QLoRA: no second model in memory), or numbers precomputed into the batch.
"""

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from lmstack.align.logprobs import sequence_logps, token_logps
from lmstack.align.losses import dpo_loss, kto_loss, orpo_loss, simpo_loss
from lmstack.errors import ConfigError
from lmstack.peft import adapter_layers, disabled
from lmstack.train.objectives import evaluating

REFERENCE_FREE = ("simpo", "orpo")


class Reference:
    """Where reference log-probs come from.

    Args:
        model: a frozen reference model (eval mode, no gradients), or None.
        adapters_off: the reference is the policy with its PEFT adapters disabled.
    With neither, batches must carry precomputed ``ref_logps`` (B,) for their rows.
    """

    def __init__(self, model: nn.Module | None = None, adapters_off: bool = False) -> None:
        if model is not None and adapters_off:
            raise ConfigError("a reference is either a separate model or the policy with adapters off, not both")
        if model is not None:
            model.eval().requires_grad_(False)
        self.model, self.adapters_off = model, adapters_off

    @classmethod
    def for_policy(cls, policy: nn.Module, copy: nn.Module | None = None) -> "Reference":
        """The policy's own base when it trains adapters, else ``copy`` (the frozen starting weights)."""
        if adapter_layers(policy):
            return cls(adapters_off=True)
        if copy is None:
            raise ConfigError("full fine-tuning with a reference-based loss needs a frozen copy of the start model")
        return cls(copy)

    @torch.no_grad()
    def token_logps(self, policy: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    scored: torch.Tensor, position_ids: torch.Tensor | None = None,
                    temperature: float = 1.0) -> torch.Tensor:
        """(B, T - 1) reference log-probs of the scored tokens (``lmstack.align.logprobs.token_logps``)."""
        if self.model is not None:
            return token_logps(self.model, input_ids, attention_mask, scored, position_ids, temperature=temperature)
        if not self.adapters_off:
            raise ConfigError("no reference: pass a reference model, adapters_off=True or precomputed ref_logps")
        with evaluating(policy), disabled(policy):  # eval: no adapter dropout in the reference pass
            return token_logps(policy, input_ids, attention_mask, scored, position_ids, temperature=temperature)

    def sequence_logps(self, policy: nn.Module, batch: dict, prefix: str = "") -> torch.Tensor:
        """(rows,) summed completion log-probs of the ``prefix`` rows of ``batch`` under the reference
        (its precomputed ``ref_{prefix}logps`` when the batch carries them)."""
        precomputed = batch.get(f"ref_{prefix}logps")
        if precomputed is not None:
            return precomputed
        return self.token_logps(policy, batch[prefix + "input_ids"], batch[prefix + "attention_mask"],
                                batch[prefix + "completion_mask"]).sum(-1)


@dataclass
class PreferenceObjective:
    """Pairwise preference loss (``loss``: sigmoid, hinge, ipo, robust, simpo or orpo).

    Args:
        beta: the KL strength (DPO family), SimPO's reward scale, ORPO's odds-ratio weight.
        label_smoothing: ε, the assumed rate of flipped labels (sigmoid = conservative DPO, robust, simpo).
        simpo_gamma: SimPO's target reward margin γ (as trl: the margin in reward units, γ = simpo_gamma).
        reference: where reference log-probs come from (not used by simpo / orpo).
    Logged per step: reward_chosen / reward_rejected (β·log-ratio means), reward_margin, reward_accuracy
    (chosen reward above rejected), logps_chosen / logps_rejected.
    """

    loss: str = "sigmoid"
    beta: float = 0.1
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    reference: Reference | None = None

    def __post_init__(self) -> None:
        if self.loss not in ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo"):
            raise ConfigError(f"unknown preference loss {self.loss!r}; expected sigmoid, hinge, ipo, robust, simpo "
                              "or orpo (kto takes unpaired data: KTOObjective)")
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.loss not in REFERENCE_FREE and self.reference is None:
            raise ConfigError(f"the {self.loss} loss needs a reference (Reference)")

    def losses(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, per-pair stats) of one pair batch."""
        ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        n = ids.shape[0] // 2
        if self.loss == "orpo":  # its NLL term scores the whole chosen sequence, prompt included (as trl)
            per_token = token_logps(model, ids, attention, attention)
            shifted = completion[:, 1:].to(per_token.dtype)
            sums, counts = (per_token * shifted).sum(-1), shifted.sum(-1)
            real = attention[:n, 1:].to(per_token.dtype)
            nll = -(per_token[:n] * real).sum() / real.sum()
        else:
            sums, counts = sequence_logps(model, ids, attention, completion)
        chosen, rejected = sums[:n], sums[n:]
        if self.loss in REFERENCE_FREE:
            averages = sums / counts.clamp(min=1)
            if self.loss == "simpo":
                loss, stats = simpo_loss(averages[:n], averages[n:], beta=self.beta, gamma=self.simpo_gamma,
                                         label_smoothing=self.label_smoothing)
            else:
                loss, stats = orpo_loss(averages[:n], averages[n:], nll, beta=self.beta)
                stats["nll"] = nll.detach()
        else:
            ref = self.reference.sequence_logps(model, batch)
            loss, stats = dpo_loss(chosen, rejected, ref[:n], ref[n:], beta=self.beta, loss_type=self.loss,
                                   label_smoothing=self.label_smoothing, chosen_lengths=counts[:n],
                                   rejected_lengths=counts[n:])
        stats.update(logps_chosen=chosen.detach(), logps_rejected=rejected.detach())
        return loss, stats

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, stats = self.losses(model, batch)
        return loss, {"tokens": int(batch["attention_mask"].bool().sum()), **_pair_metrics(stats)}

    def evaluate(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Held-out loss, reward accuracy and margin over all pairs."""
        return _evaluate_pairs(self.losses, model, batches)


def _pair_metrics(stats: dict[str, torch.Tensor]) -> dict[str, float]:
    chosen, rejected = stats["chosen_rewards"], stats["rejected_rewards"]
    out = {"reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean()),
           "reward_margin": float((chosen - rejected).mean()),
           "reward_accuracy": float((chosen > rejected).float().mean())}
    for key in ("logps_chosen", "logps_rejected", "kl", "nll", "log_odds_ratio"):
        if key in stats:
            out[key] = float(stats[key].float().mean())
    return out


def _evaluate_pairs(losses, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
    total, pairs, correct, margin = 0.0, 0, 0, 0.0
    with evaluating(model):
        for batch in batches:
            loss, stats = losses(model, batch)
            chosen, rejected = stats["chosen_rewards"], stats["rejected_rewards"]
            n = max(chosen.numel(), rejected.numel())
            total += float(loss) * n
            pairs += n
            if chosen.numel() == rejected.numel():
                correct += int((chosen > rejected).sum())
                margin += float((chosen - rejected).sum())
    if not pairs:
        return {}
    return {"eval_loss": total / pairs, "eval_reward_accuracy": correct / pairs, "eval_reward_margin": margin / pairs}


@dataclass
class KTOObjective:
    """KTO over unpaired completions: a batch of B rows with ``label`` (B,) bool (desirable or not) and the
    ``KL_*`` rows (each prompt with another row's completion) that estimate the reference point z."""

    beta: float = 0.1
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    reference: Reference | None = None

    def __post_init__(self) -> None:
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")
        if self.reference is None:
            raise ConfigError("the kto loss needs a reference (Reference)")

    def losses(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
        with torch.no_grad():
            kl_logps, _ = sequence_logps(model, batch["KL_input_ids"], batch["KL_attention_mask"],
                                         batch["KL_completion_mask"])
        ref = self.reference.sequence_logps(model, batch)
        ref_kl = self.reference.sequence_logps(model, batch, prefix="KL_")
        loss, stats = kto_loss(logps, ref, batch["label"].bool(), kl_logps, ref_kl, beta=self.beta,
                               desirable_weight=self.desirable_weight, undesirable_weight=self.undesirable_weight)
        return loss, stats

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, stats = self.losses(model, batch)
        chosen, rejected = stats["chosen_rewards"], stats["rejected_rewards"]
        metrics = {"tokens": int(batch["attention_mask"].bool().sum()), "kl": float(stats["kl"])}
        if chosen.numel():
            metrics["reward_chosen"] = float(chosen.mean())
        if rejected.numel():
            metrics["reward_rejected"] = float(rejected.mean())
        return loss, metrics

    def evaluate(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Held-out KTO loss (per row)."""
        return {k: v for k, v in _evaluate_pairs(self.losses, model, batches).items() if k == "eval_loss"}
