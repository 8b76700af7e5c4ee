"""Per-request sampling for the serving engine: OpenAI's knobs over one row of logits.

    logits (V,) -> frequency / presence penalties (on the tokens generated so far, as vLLM and OpenAI do)
                -> [temperature 0: argmax] -> / temperature -> top-k -> top-p -> one draw

Top-k, top-p and the draw are ``lmstack.generate``'s own (``top_k_filter``, ``top_p_filter``,
``sample_from``), so a request decodes as ``generate`` would with the same options. Log-probabilities
reported to the client are the model's own (log-softmax of the raw logits), as vLLM reports them.
"""

from dataclasses import dataclass, field

import torch

from lmstack.generate.processors import top_k_filter, top_p_filter
from lmstack.generate.search import sample_from


@dataclass
class SamplingParams:
    """How one request decodes.

    Attributes:
        max_tokens: new tokens at most.
        temperature: 0 for greedy decoding; otherwise logits are divided by it before sampling.
        top_p, top_k: nucleus mass (1.0: off) and top-k (0: off).
        seed: seeds this request's own generator (same seed, same tokens, whatever else is running).
        presence_penalty, frequency_penalty: subtracted from a token's logit once if it was generated
            already, and once per time it was.
        stop_token_ids: tokens that end the request (besides the model's end-of-sequence ids).
        ignore_eos: keep going past end-of-sequence tokens.
        logprobs: report the chosen token's log-probability; top_logprobs: and the n most likely.
        logit_bias: token id -> value added to its logit (OpenAI's logit_bias), before everything else.
        allowed_tokens: a callable (generated ids) -> (V,) bool mask of the tokens allowed next, or None
            (constrained decoding).
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    logit_bias: dict[int, float] = field(default_factory=dict)
    allowed_tokens: object = field(default=None, repr=False)


@dataclass
class Sample:
    """One chosen token: its id, its log-probability and the top alternatives (id, log-prob)."""

    token: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def penalize(logits: torch.Tensor, generated: list[int], presence: float, frequency: float) -> torch.Tensor:
    """logits (V,) minus presence * [count > 0] + frequency * count over the generated ids."""
    if not generated or (presence == 0 and frequency == 0):
        return logits
    counts = torch.bincount(torch.tensor(generated, device=logits.device), minlength=logits.shape[0])
    counts = counts[:logits.shape[0]].to(logits.dtype)
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def choose(logits: torch.Tensor, generated: list[int], params: SamplingParams,
           generator: torch.Generator | None) -> Sample:
    """Pick the next token from ``logits`` (V,) float32 for a request that has generated ``generated``."""
    scores = logits
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=logits.device)
        scores = scores.index_add(0, ids, torch.tensor(list(params.logit_bias.values()), device=logits.device))
    scores = penalize(scores, generated, params.presence_penalty, params.frequency_penalty)
    if params.allowed_tokens is not None:
        allowed = params.allowed_tokens(generated)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
    if params.temperature == 0:
        token = int(scores.argmax())
    else:
        scores = scores[None] / params.temperature
        if params.top_k:
            scores = top_k_filter(scores, params.top_k)
        if params.top_p < 1.0:
            scores = top_p_filter(scores, params.top_p)
        token = int(sample_from(scores.softmax(-1), generator)[0])
    if not (params.logprobs or params.top_logprobs):
        return Sample(token)
    logprobs = logits.log_softmax(-1)
    top = None
    if params.top_logprobs:
        values, ids = logprobs.topk(params.top_logprobs)
        top = list(zip(ids.tolist(), values.tolist()))
    return Sample(token, float(logprobs[token]), top)
