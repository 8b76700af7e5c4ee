"""What the RL trainers (GRPO, PPO) share: sampling completions of left-padded prompts with
``lmstack.generate`` (KV cache), their masks and positions, their text, and scoring them with reward
functions.

A rollout row is prompt (left-padded to the batch's longest) + completion (cut after its first
end-of-sequence token): ``input_ids`` (N, W + C), ``attention_mask`` 1 on real tokens, ``completion_mask``
1 on the completion's kept tokens, and ``position_ids`` counted from each row's first real token — the
positions generation used, so training scores exactly the distribution that was sampled.

A reward function is ``fn(prompts: list[str], completions: list[str], **row_fields) -> list[float]``
(trl's signature): the other fields of each prompt's dataset row (``answer``, ...) arrive as lists.
"""

import math
from typing import Callable

import torch
from torch import nn

from lmstack.errors import ConfigError
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


def mask_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions counted from each row's first real token (0 on the left padding), as generation
    numbers a left-padded batch."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def decode_completions(tokenizer, completions: torch.Tensor, mask: torch.Tensor) -> list[str]:
    """The text of each completion's masked tokens; ids past the tokenizer's vocabulary (the padded rows of a
    model's embedding, which stand for no text) are dropped."""
    limit = tokenizer.vocab_size
    return [tokenizer.decode([t for t in c[m.bool()].tolist() if t < limit], skip_special_tokens=True)
            for c, m in zip(completions, mask)]


@torch.no_grad()
def sample_completions(policy: nn.Module, prompts: list[list[int]], pad_id: int, generation: GenerationConfig,
                       num_return_sequences: int = 1, seed: int | None = None,
                       do_sample: bool = True) -> dict[str, torch.Tensor]:
    """Complete every prompt ``num_return_sequences`` times (rows of one prompt adjacent).

    Returns (CPU tensors) input_ids, attention_mask, completion_mask, position_ids (N, W + C), completions
    (N, C), sample_logps (N, C): each completion token's log-probability under the distribution it was
    drawn from (temperature applied; from generation itself, no extra forward pass), and has_eos (N,):
    whether the completion stopped on its own rather than at max_new_tokens.
    """
    ids, attention = left_padded(prompts, pad_id)
    width = ids.shape[1]
    device = next(policy.parameters()).device
    config = GenerationConfig(**{**generation.__dict__, "do_sample": do_sample,
                                 "num_return_sequences": num_return_sequences,
                                 "seed": generation.seed if seed is None else seed})
    with evaluating(policy):
        out, sample_logps = generate(policy, ids.to(device), config, attention.to(device), return_logprobs=True)
    out, sample_logps = out.cpu(), sample_logps.cpu()
    completions = out[:, width:]
    eos = config.eos_ids() or ([generation.pad_token_id] if generation.pad_token_id is not None else [])
    completion_mask = completion_mask_until_eos(completions, eos)
    has_eos = torch.isin(completions, torch.tensor(eos)).any(-1) if eos else torch.zeros(len(out), dtype=torch.bool)
    prompt_attention = attention.repeat_interleave(num_return_sequences, 0)
    attention_mask = torch.cat([prompt_attention, completion_mask], dim=1)
    return {"input_ids": out, "attention_mask": attention_mask,
            "completion_mask": torch.cat([torch.zeros_like(prompt_attention), completion_mask], dim=1),
            "position_ids": mask_positions(attention_mask), "completions": completions,
            "sample_logps": sample_logps * completion_mask, "has_eos": has_eos}


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
            scores = list(fn(prompts=prompts, completions=completions, **fields))
        except Exception as error:  # a user's function: its failure is reported, not a traceback from here
            raise ConfigError(f"reward function {name!r} raised {type(error).__name__}: {error}") from None
        if len(scores) != len(completions):
            raise ConfigError(f"reward function {name!r} returned {len(scores)} scores for {len(completions)} "
                              "completions")
        try:
            values = [math.nan if s is None else float(s) for s in scores]
        except (TypeError, ValueError):
            raise ConfigError(f"reward function {name!r} returned a score that is not a number: "
                              f"{next(s for s in scores if not isinstance(s, (int, float)) and s is not None)!r}"
                              ) from None
        total += weight * torch.tensor(values, dtype=torch.float64)
    return total.float()


class RewardSource:
    """Scores completed rollouts: a reward model (a score-head decoder, its score at the last token) or
    weighted reward functions on the decoded text (NaN where a function gave none)."""

    def __init__(self, reward_model: nn.Module | None = None, reward_fns: list[RewardFunction] | None = None,
                 weights: list[float] | None = None, tokenizer=None) -> None:
        if (reward_model is None) == (not reward_fns):
            raise ConfigError("give exactly one reward source: a reward model or reward functions")
        if reward_fns and weights is not None and len(weights) != len(reward_fns):
            raise ConfigError(f"{len(weights)} reward weights for {len(reward_fns)} reward functions")
        if reward_fns and tokenizer is None:
            raise ConfigError("reward functions read text: the tokenizer is needed")
        if reward_model is not None:
            reward_model.eval().requires_grad_(False)
        self.reward_model, self.reward_fns, self.tokenizer = reward_model, reward_fns or [], tokenizer
        self.weights = weights or [1.0] * len(self.reward_fns)

    @torch.no_grad()
    def __call__(self, rollout: dict[str, torch.Tensor], prompts: list[str], rows: list[dict]) -> torch.Tensor:
        """(N,) scores of ``sample_completions``' rows; ``prompts`` / ``rows`` one per completion."""
        if self.reward_model is not None:
            from lmstack.align.reward import sequence_rewards  # reward models are decoders with a score head

            device = next(self.reward_model.parameters()).device
            with evaluating(self.reward_model):
                return sequence_rewards(self.reward_model, *(rollout[k].to(device) for k in (
                    "input_ids", "attention_mask", "position_ids"))).cpu()
        texts = completion_texts(self.tokenizer, rollout)
        return score_completions(self.reward_fns, self.weights, prompts, texts, row_fields(rows))


def completion_texts(tokenizer, rollout: dict[str, torch.Tensor]) -> list[str]:
    """The decoded completions of a ``sample_completions`` result."""
    width = rollout["input_ids"].shape[1] - rollout["completions"].shape[1]
    return decode_completions(tokenizer, rollout["completions"], rollout["completion_mask"][:, width:])


class RewardEvaluation:
    """Held-out evaluation of an RL run: the mean score of the policy's greedy completions of held-out
    prompts. ``batches()`` feeds the Trainer (row indices), ``__call__`` is an objective's ``evaluate``."""

    def __init__(self, examples: list, rewards: RewardSource, generation: GenerationConfig, pad_id: int,
                 batch_size: int = 8) -> None:
        self.examples, self.rewards, self.generation = examples, rewards, generation
        self.pad_id, self.batch_size = pad_id, batch_size

    def batches(self):
        for start in range(0, len(self.examples), self.batch_size):
            yield {"index": torch.arange(start, min(len(self.examples), start + self.batch_size))}

    def completions(self, policy: nn.Module, indices: list[int]) -> tuple[torch.Tensor, list[str]]:
        """(scores, texts) of greedy completions of the examples ``indices``."""
        chosen = [self.examples[i] for i in indices]
        rollout = sample_completions(policy, [e.ids for e in chosen], self.pad_id, self.generation, do_sample=False)
        scores = self.rewards(rollout, [e.text for e in chosen], [e.row for e in chosen])
        return scores, completion_texts(self.rewards.tokenizer, rollout) if self.rewards.tokenizer else []

    def __call__(self, policy: nn.Module, batches) -> dict[str, float]:
        scores = torch.cat([self.completions(policy, b["index"].tolist())[0] for b in batches])
        finite = scores[~torch.isnan(scores)]
        return {"eval_reward": float(finite.mean()) if finite.numel() else math.nan}


def row_fields(rows: list[dict], repeat: int = 1) -> dict[str, list]:
    """The dataset fields reward functions receive: every column but the prompt, each value repeated for
    the ``repeat`` completions of its prompt."""
    return {k: [row.get(k) for row in rows for _ in range(repeat)] for k in rows[0]
            if k not in ("prompt", "prompts", "completions")}
