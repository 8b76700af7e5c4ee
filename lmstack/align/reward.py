"""The reward-model objective: Bradley–Terry over chosen/rejected pairs, a scalar per sequence.

The model is a decoder with a one-output score head (``lmstack.models.heads.with_score_head``); a
sequence's reward is the score at its last real token (transformers' sequence-classification pooling), so
the saved model loads in ``AutoModelForSequenceClassification`` with the same rewards.
"""

from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from lmstack.align.losses import bradley_terry_loss
from lmstack.models.heads import last_token_scores
from lmstack.train.objectives import evaluating


def sequence_rewards(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                     position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """(B,) reward of each row: the score head's output at the row's last real token."""
    return last_token_scores(model(input_ids, attention_mask, position_ids), attention_mask)[:, 0].float()


@dataclass
class RewardObjective:
    """Pairwise reward modelling on pair batches (2B, T: chosen rows, then rejected; optional ``margin`` (B,)).

    Args:
        center_coefficient: weight of the mean squared (r_c + r_r) term that keeps rewards centred.
    Logged: reward_accuracy (chosen scored above rejected), reward_margin, reward_chosen, reward_rejected.
    """

    center_coefficient: float = 0.0

    def losses(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rewards = sequence_rewards(model, batch["input_ids"], batch["attention_mask"])
        chosen, rejected = rewards.chunk(2)
        return bradley_terry_loss(chosen, rejected, batch.get("margin"), self.center_coefficient), chosen, rejected

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, chosen, rejected = self.losses(model, batch)
        chosen, rejected = chosen.detach(), rejected.detach()
        return loss, {"tokens": int(batch["attention_mask"].bool().sum()),
                      "reward_accuracy": float((chosen > rejected).float().mean()),
                      "reward_margin": float((chosen - rejected).mean()),
                      "reward_chosen": float(chosen.mean()), "reward_rejected": float(rejected.mean())}

    def evaluate(self, model: nn.Module, batches: Iterable[dict]) -> dict[str, float]:
        """Held-out loss, pair accuracy and mean margin."""
        total, pairs, correct, margin = 0.0, 0, 0, 0.0
        with evaluating(model):
            for batch in batches:
                loss, chosen, rejected = self.losses(model, batch)
                total += float(loss) * chosen.numel()
                pairs += chosen.numel()
                correct += int((chosen > rejected).sum())
                margin += float((chosen - rejected).sum())
        if not pairs:
            return {}
        return {"eval_loss": total / pairs, "eval_accuracy": correct / pairs, "eval_reward_margin": margin / pairs}
