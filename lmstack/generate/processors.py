"""Logits processors: pure functions over next-token scores (B, V), applied in transformers' order:

    repetition penalty -> min_new_tokens (suppress EOS) -> [sampling only] temperature -> top-k -> top-p

Filtered entries become -inf. Each matches the transformers processor of the same name exactly.
"""

import torch

from lmstack.generate.config import GenerationConfig


def repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: float,
                       skip_before: torch.Tensor | None = None) -> torch.Tensor:
    """CTRL penalty (Keskar et al. 2019): each token already in a row's ``seen`` ids has its score divided
    by ``penalty`` if positive, multiplied if negative.

    Args:
        scores: (B, V). seen: (B, S) token ids so far. skip_before: (B,) ids before this column are ignored
            (a row's left padding).
    """
    vocab = scores.shape[-1]
    seen = seen.clamp(max=vocab)  # ids past the output vocabulary land in a scratch column
    if skip_before is not None:
        columns = torch.arange(seen.shape[1], device=seen.device)
        seen = seen.masked_fill(columns[None, :] < skip_before[:, None], vocab)
    padded = torch.nn.functional.pad(scores, (0, 1))
    picked = padded.gather(1, seen)
    picked = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, seen, picked)[:, :vocab]


def suppress_tokens(scores: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """Set the scores of ``token_ids`` to -inf (e.g. EOS before min_new_tokens)."""
    scores = scores.clone()
    scores[:, token_ids] = float("-inf")
    return scores


def top_k_filter(scores: torch.Tensor, k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the k highest scores per row (ties with the k-th are kept); the rest become -inf."""
    k = min(max(k, min_tokens_to_keep), scores.shape[-1])
    kth = torch.topk(scores, k).values[..., -1, None]
    return scores.masked_fill(scores < kth, float("-inf"))


def top_p_filter(scores: torch.Tensor, p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter (Holtzman et al. 2019): keep the smallest set of top tokens whose probability mass
    exceeds ``p``; the rest become -inf."""
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - p)  # the low tail holding at most 1 - p of the mass
    remove[..., -min_tokens_to_keep:] = False
    return scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))


class LogitsPipeline:
    """The processors a GenerationConfig asks for, in transformers' order.

    Args:
        config: the (validated) generation config; eos ids must be resolved in it.
        prompt_length: T, to count new tokens for min_new_tokens.
        skip_before: (B,) start of each row's real tokens, so left padding is not penalised.
        min_tokens_to_keep: top-k/top-p never keep fewer (beam sampling keeps n_eos + 1).
    """

    def __init__(self, config: GenerationConfig, prompt_length: int, skip_before: torch.Tensor | None = None,
                 min_tokens_to_keep: int = 1) -> None:
        self.config, self.prompt_length = config, prompt_length
        self.skip_before, self.min_tokens_to_keep = skip_before, min_tokens_to_keep

    def __call__(self, seen: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        """seen: (B, S) ids so far (prompt + generated); scores: (B, V) float32 -> processed (B, V)."""
        c = self.config
        if c.repetition_penalty != 1.0:
            scores = repetition_penalty(scores, seen, c.repetition_penalty, self.skip_before)
        if c.min_new_tokens > 0 and c.eos_ids() and seen.shape[1] - self.prompt_length < c.min_new_tokens:
            scores = suppress_tokens(scores, c.eos_ids())
        if not c.do_sample:
            return scores
        if c.temperature != 1.0:
            scores = scores / c.temperature
        if c.top_k:
            scores = top_k_filter(scores, c.top_k, self.min_tokens_to_keep)
        if c.top_p < 1.0:
            scores = top_p_filter(scores, c.top_p, self.min_tokens_to_keep)
        return scores
