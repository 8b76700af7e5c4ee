"""GRPO: group-relative policy optimisation with verifiable rewards, no value model.

Each step ``GRPORollouts.next_batch`` draws P prompts, samples G completions of each with
``lmstack.generate`` (KV cache, sampling), scores every completion with the reward functions and turns
the rewards into group-normalised advantages; ``GRPOObjective`` then takes the clipped surrogate with an
optional k3 KL penalty against the reference (``lmstack.align.losses.grpo_loss``). The rollout source is
the Trainer's batch source, so checkpoints, resume, metrics and plots are the shared loop's.

A reward function is ``fn(prompts: list[str], completions: list[str], **row_fields) -> list[float]``
(trl's signature). One that raises stops the run with its name before any update; a NaN reward leaves
that completion out of the loss and is counted (``reward_nan`` in the step's metrics).
"""

import math
import re
from typing import Callable

import torch
from torch import nn

from lmstack.align.logprobs import token_logps
from lmstack.align.losses import grpo_loss, group_advantages
from lmstack.align.preference import Reference
from lmstack.data.labeled import ShuffledBatches
from lmstack.errors import ConfigError, DataError
from lmstack.generate import GenerationConfig, generate
from lmstack.train.objectives import evaluating

RewardFunction = Callable[..., list[float]]


def completion_mask_until_eos(completions: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """(N, C) 1 for each completion's tokens up to and including its first end-of-sequence token."""
    is_eos = torch.isin(completions, torch.tensor(eos_ids, device=completions.device)) if eos_ids else \
        torch.zeros_like(completions, dtype=torch.bool)
    after = (is_eos.cumsum(1) - is_eos.long()) > 0  # strictly after the first EOS
    return (~after).long()


def left_padded(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask) (B, longest) of ``prompts`` padded on the left, so every prompt ends where
    generation starts."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id)
    attention = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, prompt in enumerate(prompts):
        ids[r, width - len(prompt):] = torch.tensor(prompt)
        attention[r, width - len(prompt):] = 1
    return ids, attention


def decode_completions(tokenizer, completions: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The text of each completion's masked tokens; ids past the tokenizer's vocabulary (the padded rows of a
    model's embedding, which stand for no text) are dropped."""
    limit = tokenizer.vocab_size
    return [tokenizer.decode([t for t in c[m.bool()].tolist() if t < limit], skip_special_tokens=True)
            for c, m in zip(completions, mask)]


def score_completions(reward_fns: list[RewardFunction], weights: list[float], prompts: list[str],
                      completions: list[str], fields: dict[str, list]) -> torch.Tensor:
    """(N,) weighted sum of every reward function's scores (NaN where a function returned NaN / None).

    Raises:
        ConfigError: a reward function raised, or returned the wrong number of scores.
    """
    total = torch.zeros(len(completions), dtype=torch.float64)
    for fn, weight in zip(reward_fns, weights):
        name = getattr(fn, "__name__", repr(fn))
        try:
            scores = fn(prompts=prompts, completions=completions, **fields)
        except Exception as error:  # a user's function: its failure is reported, not a traceback from here
            raise ConfigError(f"reward function {name!r} raised {type(error).__name__}: {error}") from None
        if len(scores) != len(completions):
            raise ConfigError(f"reward function {name!r} returned {len(scores)} scores for {len(completions)} "
                              "completions")
        total += weight * torch.tensor([math.nan if s is None else float(s) for s in scores], dtype=torch.float64)
    return total.float()


class GRPORollouts:
    """The GRPO batch source: prompts -> groups of sampled completions -> rewards and advantages.

    Args:
        policy: the model being trained (sampled in eval mode, without gradients).
        prompts: token ids of each prompt; ``rows`` the dataset rows they came from (their other fields
            reach the reward functions, e.g. ``answer``); ``texts`` the prompt strings.
        group_size: G completions per prompt; prompts_per_step: P prompts per batch (batch = P·G rows).
        generation: sampling options (do_sample, temperature, top_p, max_new_tokens, eos/pad ids).
        reference / beta: reference log-probs are computed when beta > 0.
    """

    def __init__(self, policy: nn.Module, prompts: list[list[int]], rows: list[dict], texts: list[str],
                 tokenizer, reward_fns: list[RewardFunction], *, group_size: int, prompts_per_step: int,
                 generation: GenerationConfig, seed: int, pad_id: int, reward_weights: list[float] | None = None,
                 reference: Reference | None = None, beta: float = 0.0, scale_rewards: bool = True) -> None:
        if group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages are relative to the group), got {group_size}")
        if not prompts:
            raise DataError("no prompts")
        if not reward_fns:
            raise ConfigError("GRPO needs at least one reward function")
        self.policy, self.prompts, self.rows, self.texts, self.tokenizer = policy, prompts, rows, texts, tokenizer
        self.reward_fns, self.weights = reward_fns, reward_weights or [1.0] * len(reward_fns)
        self.group_size, self.prompts_per_step, self.generation = group_size, prompts_per_step, generation
        self.seed, self.pad_id, self.reference, self.beta = seed, pad_id, reference, beta
        self.scale_rewards = scale_rewards
        self.order = ShuffledBatches(len(prompts), prompts_per_step, seed, lambda picked: picked)  # prompt order
        self.rollouts = 0

    @torch.no_grad()
    def next_batch(self) -> dict:
        picked = self.order.next_batch()
        ids, attention = left_padded([self.prompts[i] for i in picked], self.pad_id)
        width = ids.shape[1]
        device = next(self.policy.parameters()).device
        config = GenerationConfig(**{**self.generation.__dict__, "do_sample": True,
                                     "num_return_sequences": self.group_size,
                                     "seed": (self.seed * 7_919 + self.rollouts) % 2**63})
        self.rollouts += 1
        with evaluating(self.policy):
            out = generate(self.policy, ids.to(device), config, attention.to(device))
        completions = out[:, width:]
        eos = config.eos_ids() or ([self.generation.pad_token_id] if self.generation.pad_token_id is not None else [])
        completion_mask = completion_mask_until_eos(completions, eos)
        texts = decode_completions(self.tokenizer, completions.cpu(), completion_mask.cpu())
        repeat = lambda values: [v for v in values for _ in range(self.group_size)]  # noqa: E731
        fields = {k: repeat([self.rows[i].get(k) for i in picked]) for k in self.rows[picked[0]]
                  if k not in ("prompt", "prompts", "completions")}
        rewards = score_completions(self.reward_fns, self.weights, repeat([self.texts[i] for i in picked]), texts,
                                    fields)
        valid = ~torch.isnan(rewards)
        advantages = group_advantages(torch.where(valid, rewards, 0.0), self.group_size, self.scale_rewards)
        advantages = torch.where(valid, advantages, 0.0)
        full_attention = torch.cat([attention.repeat_interleave(self.group_size, 0), completion_mask], dim=1)
        batch = {"input_ids": out.cpu(), "attention_mask": full_attention,
                 "completion_mask": torch.cat([torch.zeros_like(attention.repeat_interleave(self.group_size, 0)),
                                               completion_mask.cpu() * valid[:, None]], dim=1),
                 "advantages": advantages, "rewards": rewards}
        if self.beta > 0:
            if self.reference is None:
                raise ConfigError("GRPO with beta > 0 needs a reference")
            batch["ref_logps"] = self.reference.token_logps(
                self.policy, *(batch[k].to(device) for k in ("input_ids", "attention_mask", "completion_mask"))).cpu()
        return batch

    def state_dict(self) -> dict:
        return {**self.order.state_dict(), "rollouts": self.rollouts}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state)
        self.rollouts = state["rollouts"]


class GRPOObjective:
    """The GRPO loss over a rollout batch (``GRPORollouts``); one optimizer step per rollout batch, so the
    sampling policy is the current one and the ratio starts at 1 (``old_logps`` in the batch overrides it)."""

    def __init__(self, beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: str = "grpo", max_completion_length: int | None = None) -> None:
        self.beta, self.epsilon_low, self.epsilon_high = beta, epsilon_low, epsilon_high
        self.loss_type, self.max_completion_length = loss_type, max_completion_length

    def __call__(self, model: nn.Module, batch: dict) -> tuple[torch.Tensor, dict]:
        logps = token_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
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


def evaluate_rewards(policy: nn.Module, prompts: list[list[int]], rows: list[dict], texts: list[str], tokenizer,
                     reward_fns: list[RewardFunction], generation: GenerationConfig, pad_id: int,
                     batch_size: int = 8) -> tuple[float, list[str]]:
    """Mean reward of ``policy``'s greedy completions of held-out prompts, and the completions."""
    scores, outputs = [], []
    for start in range(0, len(prompts), batch_size):
        chunk = list(range(start, min(len(prompts), start + batch_size)))
        ids, attention = left_padded([prompts[i] for i in chunk], pad_id)
        width = ids.shape[1]
        config = GenerationConfig(**{**generation.__dict__, "do_sample": False, "num_return_sequences": 1})
        device = next(policy.parameters()).device
        with evaluating(policy):
            out = generate(policy, ids.to(device), config, attention.to(device))[:, width:].cpu()
        mask = completion_mask_until_eos(out, config.eos_ids())
        texts_out = decode_completions(tokenizer, out, mask)
        fields = {k: [rows[i].get(k) for i in chunk] for k in rows[chunk[0]] if k not in ("prompt", "completions")}
        scores += score_completions(reward_fns, [1.0] * len(reward_fns), [texts[i] for i in chunk], texts_out,
                                    fields).tolist()
        outputs += texts_out
    finite = [s for s in scores if not math.isnan(s)]
    return (sum(finite) / len(finite) if finite else math.nan), outputs


def exact_answer_reward(completions: list[str], answer: list, **_) -> list[float]:
    """1.0 where the last number in the completion equals the row's ``answer``, else 0.0."""
    out = []
    for text, expected in zip(completions, answer):
        numbers = re.findall(r"-?\d+(?:\.\d+)?", text)
        out.append(1.0 if numbers and float(numbers[-1]) == float(expected) else 0.0)
    return out

