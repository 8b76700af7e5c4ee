"""PPO for RLHF: a policy and a value model trained on their own samples, scored by a reward model or
reward functions, held near a reference by a per-token KL penalty.

One rollout (``PPORollouts._rollout``), with the weights of that moment and no gradients:

    prompts -> sampled completions (lmstack.generate: KV cache, temperature)      sample_completions
    old log-probs (from generation), reference log-probs, values (value model)  at the completion tokens
    score: reward model at the last token, or reward functions on the text       (− missing_eos_penalty)
    per-token reward r_t = −kl_coef·(log π − log π_ref), + score at the last token  ppo_rewards
    advantages, returns = GAE(r, V); advantages whitened over the batch              gae, masked_whiten

then ``ppo_epochs`` passes over it in shuffled minibatches, one optimizer step each (``PPOObjective``:
clipped policy loss + vf_coef · clipped value loss). The Trainer sees one minibatch per ``next_batch``, so
checkpoints, resume (the unfinished rollout is saved with the data position), metrics and plots are the
shared loop's.

Tensors are aligned with ``token_logps``: column j of (N, T − 1) is the prediction of token j + 1 from
positions ≤ j; the value at column j is the value model's score at position j, the state that token is
chosen in. The score lands on the completion's last kept token (its EOS, if it stopped): trl 1.12 puts it
one position later, on the first padding slot (huggingface/trl#3750), which lmstack does not copy; its
pieces are tested equal to trl's given the same placement (tests/parity/test_trl_ppo_parity.py).
"""

import math

import torch
from torch import nn

from lmstack.align.logprobs import token_logps
from lmstack.align.losses import gae, masked_mean, masked_whiten, ppo_losses, ppo_rewards
from lmstack.align.preference import Reference
from lmstack.align.rollouts import RewardEvaluation, RewardSource, sample_completions
from lmstack.data.labeled import ShuffledBatches
from lmstack.errors import ConfigError, DataError
from lmstack.generate import GenerationConfig
from lmstack.train.objectives import evaluating


class PolicyAndValue(nn.Module):
    """What PPO trains: the policy (a decoder LM) and the value model (a decoder with a one-output score
    head, ``lmstack.models.heads.with_score_head``), side by side so one optimizer and one checkpoint hold
    both."""

    def __init__(self, policy: nn.Module, value: nn.Module) -> None:
        super().__init__()
        if not hasattr(value, "score"):
            raise ConfigError("the PPO value model needs a score head (lmstack.models.heads.with_score_head)")
        self.policy, self.value = policy, value

    def values(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               position_ids: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T - 1) value of the state before each token 1..T-1 (the value model's score at position j)."""
        hidden = self.value.hidden_states(input_ids, attention_mask, position_ids)[:, :-1]
        return self.value.score(hidden)[..., 0].float()


class PPORollouts:
    """The PPO batch source: a rollout of ``rollout_size`` prompts, then its minibatches for ``ppo_epochs``.

    Args:
        model: the ``PolicyAndValue`` being trained (sampled in eval mode, without gradients).
        examples: ``lmstack.data.prompts.PromptExample``s (token ids, text, dataset row).
        rewards: what scores a completion: a reward model, or reward functions on the text.
        reference: the KL anchor (a frozen copy, or the policy with adapters off).
        generation: sampling options (max_new_tokens, temperature, top_k / top_p, eos / pad ids).
        missing_eos_penalty: subtracted from the score of a completion that never stopped.
    """

    def __init__(self, model: PolicyAndValue, examples: list, rewards: RewardSource, *, reference: Reference,
                 generation: GenerationConfig, pad_id: int, seed: int, rollout_size: int, minibatch_size: int,
                 ppo_epochs: int = 4, kl_coef: float = 0.05, gamma: float = 1.0, lam: float = 0.95,
                 whiten_rewards: bool = False, missing_eos_penalty: float | None = None) -> None:
        if not examples:
            raise DataError("no prompts")
        if minibatch_size < 1 or rollout_size % minibatch_size:
            raise ConfigError(f"the rollout ({rollout_size} prompts) must split into whole minibatches of "
                              f"{minibatch_size}")
        if ppo_epochs < 1:
            raise ConfigError(f"ppo_epochs must be >= 1, got {ppo_epochs}")
        self.model, self.examples, self.rewards = model, examples, rewards
        self.reference, self.generation, self.pad_id, self.seed = reference, generation, pad_id, seed
        self.rollout_size, self.minibatch_size, self.ppo_epochs = rollout_size, minibatch_size, ppo_epochs
        self.kl_coef, self.gamma, self.lam = kl_coef, gamma, lam
        self.whiten_rewards, self.missing_eos_penalty = whiten_rewards, missing_eos_penalty
        self.order = ShuffledBatches(len(examples), rollout_size, seed, lambda picked: picked)
        self.rollouts = 0
        self.pending: list[dict] = []  # the current rollout's minibatches not yet trained on

    def next_batch(self) -> dict:
        if not self.pending:
            self.pending = self._minibatches(self._rollout())
        return self.pending.pop(0)

    @torch.no_grad()
    def _rollout(self) -> dict:
        """One batch of experience: samples and everything PPO needs from the weights that drew them."""
        picked = [self.examples[i] for i in self.order.next_batch()]
        temperature = self.generation.temperature
        seed = (self.seed * 7_919 + self.rollouts) % 2**63
        self.rollouts += 1
        rollout = sample_completions(self.model.policy, [e.ids for e in picked], self.pad_id, self.generation, 1,
                                     seed)
        device = next(self.model.parameters()).device
        ids, attention, completion, positions = (rollout[k].to(device) for k in (
            "input_ids", "attention_mask", "completion_mask", "position_ids"))
        # The behaviour policy's log-probs come from generation itself (trl's choice too): no forward pass.
        width = ids.shape[1] - rollout["completions"].shape[1]
        logps = torch.cat([torch.zeros(len(ids), width - 1), rollout["sample_logps"]], dim=1).to(device)
        with evaluating(self.model):
            values = self.model.values(ids, attention, positions)
        ref_logps = self.reference.token_logps(self.model.policy, ids, attention, completion, positions,
                                               temperature=temperature)
        scores = self.rewards(rollout, [e.text for e in picked], [e.row for e in picked]).to(device)
        if self.missing_eos_penalty is not None:
            scores = scores - self.missing_eos_penalty * (~rollout["has_eos"]).to(device).float()
        valid = ~torch.isnan(scores)  # a NaN score trains nothing from its completion (counted)
        mask = completion[:, 1:] * valid[:, None]
        scores = torch.where(valid, scores, 0.0)
        last = (mask * torch.arange(1, mask.shape[1] + 1, device=device)).argmax(-1)  # last kept token
        values = values * mask
        rewards, kl = ppo_rewards(logps * mask, ref_logps * mask, scores, last, self.kl_coef)
        rewards = rewards * mask
        if self.whiten_rewards:
            rewards = masked_whiten(rewards, mask, shift_mean=False) * mask
        advantages, returns = gae(rewards, values, mask, self.gamma, self.lam)
        advantages = masked_whiten(advantages, mask) * mask
        kl_sum = (kl * mask).sum(-1)
        per_row = valid.float().sum().clamp(min=1)
        stats = {"kl": kl_sum.sum() / per_row, "score": (scores * valid).sum() / per_row,
                 "non_score_reward": -self.kl_coef * kl_sum.sum() / per_row,
                 "completion_length": mask.sum(-1).float().sum() / per_row,
                 "eos_fraction": rollout["has_eos"].float().mean(), "reward_nan": (~valid).sum()}
        stats["rlhf_reward"] = stats["score"] + stats["non_score_reward"]
        return {"input_ids": ids, "attention_mask": attention, "position_ids": positions,
                "completion_mask": torch.cat([completion[:, :1], mask], dim=1), "old_logps": logps * mask,
                "old_values": values, "advantages": advantages, "returns": returns,
                **{f"rollout_{k}": v.detach().float() for k, v in stats.items()}}

    def _minibatches(self, rollout: dict) -> list[dict]:
        """``ppo_epochs`` shuffled passes over the rollout, ``minibatch_size`` rows each (seeded)."""
        generator = torch.Generator().manual_seed((self.seed * 104_729 + self.rollouts) % 2**63)
        n = rollout["input_ids"].shape[0]
        out = []
        for _ in range(self.ppo_epochs):
            order = torch.randperm(n, generator=generator)
            for start in range(0, n, self.minibatch_size):
                rows = order[start:start + self.minibatch_size].to(rollout["input_ids"].device)
                out.append({k: (v[rows] if v.dim() else v).cpu() for k, v in rollout.items()})
        return out

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "rollouts": self.rollouts, "pending": self.pending}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.rollouts, self.pending = state["rollouts"], list(state["pending"])


class PPOObjective:
    """Clipped PPO over one minibatch of a rollout: policy loss + ``vf_coef`` · value loss (``temperature``:
    the sampler's, so ratios compare the distribution that was sampled).

    Logged per step: policy_loss, value_loss, clip_fraction (tokens where the clipped term won),
    value_clip_fraction, ratio, approx_kl (½·mean (log ρ)²), entropy (of the policy at the completion
    tokens), and the rollout's kl (summed per completion), score, non_score_reward, rlhf_reward,
    completion_length, eos_fraction, reward_nan.
    """

    def __init__(self, clip_range: float = 0.2, clip_range_value: float = 0.2, vf_coef: float = 0.1,
                 temperature: float = 1.0, evaluation: RewardEvaluation | None = None) -> None:
        self.clip_range, self.clip_range_value = clip_range, clip_range_value
        self.vf_coef, self.temperature, self.evaluation = vf_coef, temperature, evaluation

    def __call__(self, model: PolicyAndValue, batch: dict) -> tuple[torch.Tensor, dict]:
        ids, attention, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
        mask = batch["completion_mask"][:, 1:]
        logps, entropy = token_logps(model.policy, ids, attention, batch["completion_mask"], positions,
                                     with_entropy=True, temperature=self.temperature)
        values = model.values(ids, attention, positions) * mask
        policy_loss, value_loss, stats = ppo_losses(
            logps, batch["old_logps"], batch["advantages"], values, batch["old_values"], batch["returns"], mask,
            clip_range=self.clip_range, clip_range_value=self.clip_range_value)
        log_ratio = (logps - batch["old_logps"]).detach()
        metrics = {"tokens": int(mask.sum()), "policy_loss": float(policy_loss.detach()),
                   "value_loss": float(value_loss.detach()),
                   "approx_kl": float(0.5 * masked_mean(log_ratio**2, mask)),
                   "entropy": float(masked_mean(entropy, mask)) if mask.any() else math.nan,
                   **{k: float(v) for k, v in stats.items()},
                   **{k.removeprefix("rollout_"): float(v) for k, v in batch.items() if k.startswith("rollout_")}}
        return policy_loss + self.vf_coef * value_loss, metrics

    def evaluate(self, model: PolicyAndValue, batches) -> dict[str, float]:
        """The held-out reward of the policy's greedy completions (``RewardEvaluation``)."""
        if self.evaluation is None:
            raise ConfigError("this PPOObjective was built without a held-out evaluation")
        return self.evaluation(model.policy, batches)
