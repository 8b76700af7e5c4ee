"""GRPO: group-relative policy optimisation with verifiable rewards, no value model.

Each step ``GRPORollouts.next_batch`` draws P prompts, samples G completions of each with
``lmstack.generate`` (KV cache, sampling), scores every completion with the reward functions and turns
the rewards into group-normalised advantages; ``GRPOObjective`` then takes the clipped surrogate with an
optional k3 KL penalty against the reference (``lmstack.align.losses.grpo_loss``). The rollout source is
the Trainer's batch source, so checkpoints, resume, metrics and plots are the shared loop's.

Rewards come from a ``RewardSource`` (``lmstack.align.rollouts``): reward functions
``fn(prompts, completions, **row_fields) -> list[float]`` (trl's signature) or a reward model. A function
that raises stops the run with its name before any update; a NaN reward leaves that completion out of the
loss and is counted (``reward_nan`` in the step's metrics).
"""

import math

import torch
from torch import nn

from lmstack.align.logprobs import token_logps
from lmstack.align.losses import grpo_loss, group_advantages
from lmstack.align.preference import Reference
from lmstack.align.rollouts import RewardEvaluation, RewardSource, sample_completions
from lmstack.data.labeled import ShuffledBatches
from lmstack.errors import ConfigError, DataError
from lmstack.generate import GenerationConfig

class GRPORollouts:
    """The GRPO batch source: prompts -> groups of sampled completions -> rewards and advantages.

    Args:
        policy: the model being trained (sampled in eval mode, without gradients).
        examples: ``lmstack.data.prompts.PromptExample``s (token ids, text, dataset row).
        rewards: what scores a completion (reward functions or a reward model).
        group_size: G completions per prompt; prompts_per_step: P prompts per batch (batch = P·G rows).
        generation: sampling options (temperature, top_k / top_p, max_new_tokens, eos / pad ids).
        reference / beta: reference log-probs are computed when beta > 0.
    """

    def __init__(self, policy: nn.Module, examples: list, rewards: RewardSource, *, group_size: int,
                 prompts_per_step: int, generation: GenerationConfig, seed: int, pad_id: int,
                 reference: Reference | None = None, beta: float = 0.0, scale_rewards: bool = True) -> None:
        if group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
        if not examples:
            raise DataError("no prompts")
        if beta > 0 and reference is None:
            raise ConfigError("GRPO with beta > 0 needs a reference")
        self.policy, self.examples, self.rewards = policy, examples, rewards
        self.group_size, self.prompts_per_step, self.generation = group_size, prompts_per_step, generation
        self.seed, self.pad_id, self.reference, self.beta = seed, pad_id, reference, beta
        self.scale_rewards = scale_rewards
        self.order = ShuffledBatches(len(examples), prompts_per_step, seed, lambda picked: picked)  # prompt order
        self.rollouts = 0

    @torch.no_grad()
    def next_batch(self) -> dict:
        picked = [self.examples[i] for i in self.order.next_batch()]
        seed = (self.seed * 7_919 + self.rollouts) % 2**63
        self.rollouts += 1
        rollout = sample_completions(self.policy, [e.ids for e in picked], self.pad_id, self.generation,
                                     self.group_size, seed)
        each = lambda values: [v for v in values for _ in range(self.group_size)]  # noqa: E731
        rewards = self.rewards(rollout, each([e.text for e in picked]), each([e.row for e in picked]))
        valid = ~torch.isnan(rewards)
        advantages = group_advantages(torch.where(valid, rewards, 0.0), self.group_size, self.scale_rewards)
        batch = {k: rollout[k] for k in ("input_ids", "attention_mask", "position_ids")}
        batch.update(completion_mask=rollout["completion_mask"] * valid[:, None],  # a NaN reward trains nothing
                     advantages=torch.where(valid, advantages, 0.0), rewards=rewards)
        if self.beta > 0:
            device = next(self.policy.parameters()).device
            batch["ref_logps"] = self.reference.token_logps(
                self.policy, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask",
                                                              "position_ids")),
                temperature=self.generation.temperature).cpu()  # rollouts always sample, at this temperature
        return batch

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.rollouts = state["rollouts"]


class GRPOObjective:
    """The GRPO loss over a rollout batch (``GRPORollouts``); one optimizer step per rollout batch, so the
    sampling policy is the current one and the ratio starts at 1 (``old_logps`` in the batch overrides it).
    ``temperature``: the sampling temperature, under which the policy (and the reference) are scored, as
    trl does. ``evaluation`` (a ``RewardEvaluation``) scores held-out prompts."""

    def __init__(self, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "grpo", max_completion_length: int | None = None,
                 evaluation: RewardEvaluation | None = None, temperature: float = 1.0) -> None:
        self.beta, self.epsilon_low, self.epsilon_high = beta, epsilon_low, epsilon_high
        self.loss_type, self.max_completion_length, self.evaluation = loss_type, max_completion_length, evaluation
        self.temperature = temperature

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logps = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                            batch.get("position_ids"), temperature=self.temperature)
        mask = batch["completion_mask"][:, 1:]
        old = batch.get("old_logps")
        loss, stats = grpo_loss(logps, logps.detach() if old is None else old, batch["advantages"], mask,
                                beta=self.beta, ref_logps=batch.get("ref_logps"), epsilon_low=self.epsilon_low,
                                epsilon_high=self.epsilon_high, loss_type=self.loss_type,
                                max_completion_length=self.max_completion_length)
        rewards = batch["rewards"]
        valid = rewards[~torch.isnan(rewards)]
        metrics = {"tokens": int(mask.sum()), "reward": float(valid.mean()) if valid.numel() else math.nan,
                   "reward_std": float(valid.std()) if valid.numel() > 1 else 0.0,
                   "reward_nan": int(torch.isnan(rewards).sum()),
                   "completion_length": float(mask.sum(-1).float().mean()),
                   **{k: float(v) for k, v in stats.items()}}
        return loss, metrics

    def evaluate(self, model: nn.Module, batches) -> dict[str, float]:
        if self.evaluation is None:
            raise ConfigError("this GRPOObjective was built without a held-out evaluation")
        return self.evaluation(model, batches)
