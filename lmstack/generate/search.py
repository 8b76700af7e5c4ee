"""Decoding strategies over an engine: greedy / sampling (one loop) and beam search.

Both follow transformers' semantics exactly (same processors, same EOS and padding rules, same beam
bookkeeping), which is what makes greedy and beam outputs token-identical. Shapes: B rows, K beams,
V vocabulary, S tokens so far.
"""

from typing import Callable, Iterator

import torch

from lmstack.errors import NumericalError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.processors import LogitsPipeline

# (sequences so far (N, S), newest tokens (N,)) -> (N,) bool: the row should stop here
StopCheck = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def check_finite(logits: torch.Tensor) -> torch.Tensor:
    """The prompt's logits, refused if any is NaN or inf (a model with non-finite weights would otherwise
    sample an error or pick an arbitrary token). Checked once per call, on the prefill."""
    if not bool(torch.isfinite(logits).all()):
        raise NumericalError("the model produced non-finite logits for the prompt; its weights probably hold NaN "
                             "or inf (lmstack info reports such tensors)")
    return logits


def sample_from(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(N,) one draw from each row of ``probs`` (N, V) by inverting its CDF with one uniform per row: the
    distribution ``torch.multinomial`` samples, for V times fewer random numbers (multinomial draws one
    exponential per vocabulary entry: ~10% of a small model's decode step). A token of probability 0 is
    never drawn: u lies in (0, 1], so the first index whose CDF reaches u·total has a positive mass."""
    cdf = probs.cumsum(-1)
    u = 1.0 - torch.rand(probs.shape[0], 1, generator=generator, device=probs.device, dtype=cdf.dtype)
    return torch.searchsorted(cdf, u * cdf[:, -1:]).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def sample_tokens(engine, input_ids: torch.Tensor, config: GenerationConfig, process: LogitsPipeline,
                  should_stop: StopCheck, generator: torch.Generator | None,
                  logprobs: list | None = None) -> Iterator[torch.Tensor]:
    """Greedy or sampled decoding; yields the new token of every row, (B,), one step at a time.

    A finished row keeps receiving ``pad_token_id``. Decoding ends when every row is finished or after
    ``max_new_tokens`` steps; the model is not run after the last token. With ``logprobs`` (a list),
    each step appends the (B,) log-probability of its tokens under the processed distribution (the one
    sampled from: temperature, top-k / top-p applied).
    """
    B, T = input_ids.shape
    sequences = torch.empty(B, T + config.max_new_tokens, dtype=torch.long, device=input_ids.device)
    sequences[:, :T] = input_ids
    unfinished = torch.ones(B, dtype=torch.bool, device=input_ids.device)
    logits = check_finite(engine.prefill())
    for step in range(config.max_new_tokens):
        length = T + step
        scores = process(sequences[:, :length], logits)
        if config.do_sample:
            tokens = sample_from(scores.softmax(dim=-1), generator)
        else:
            tokens = scores.argmax(dim=-1)
        if logprobs is not None:
            logprobs.append(scores.float().log_softmax(-1).gather(1, tokens[:, None]).squeeze(1))
        if config.pad_token_id is not None:
            tokens = torch.where(unfinished, tokens, config.pad_token_id)
        sequences[:, length] = tokens
        yield tokens
        unfinished &= ~should_stop(sequences[:, :length + 1], tokens)
        if not bool(unfinished.any()) or step + 1 == config.max_new_tokens:
            return
        logits = engine.step(tokens)


def beam_search(engine, input_ids: torch.Tensor, config: GenerationConfig, process: LogitsPipeline,
                should_stop: StopCheck, generator: torch.Generator | None) -> torch.Tensor:
    """Beam search (or beam sampling when ``config.do_sample``), as transformers implements it.

    Each step scores all K * V continuations of every prompt, keeps the best ``keep = max(2, 1 + n_eos) * K``
    (so K can continue even if some hit EOS), moves the K best unfinished ones on, and merges finished
    ones into a K-best list scored by sum log p / new_length**length_penalty. Stops when no running beam
    can beat the worst finished one (see ``_improvable``), when ``early_stopping=True`` and K beams are
    finished, or when every candidate hit a stop condition.

    Args:
        input_ids: (B * K, T) prompts, each repeated K times.
    Returns:
        (B * num_return_sequences, T + generated) best finished beams, best first within each prompt.
    """
    K, n_eos = config.num_beams, len(config.eos_ids())
    B, T = input_ids.shape[0] // K, input_ids.shape[1]
    max_length, keep = T + config.max_new_tokens, max(2, 1 + n_eos) * K
    device = input_ids.device
    in_top_k = torch.arange(keep, device=device) < K
    fill = config.pad_token_id if config.pad_token_id else (config.eos_ids()[0] if n_eos else -1)
    running = torch.full((B, K, max_length), fill, dtype=torch.long, device=device)
    running[:, :, :T] = input_ids.view(B, K, T)
    running_scores = torch.zeros(B, K, device=device)
    running_scores[:, 1:] = -1e9  # all K beams start identical: expand only the first
    running_origin = torch.full((B, K, config.max_new_tokens), -1, dtype=torch.long, device=device)
    done = _Finished(running.clone(), torch.full((B, K), -1e9, device=device), running_origin.clone(),
                     torch.zeros(B, K, dtype=torch.bool, device=device))
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    logits = check_finite(engine.prefill())
    for length in range(T, max_length):
        log_probs = process(running.view(B * K, max_length)[:, :length], logits.log_softmax(dim=-1))
        V = log_probs.shape[-1]
        total = (log_probs.view(B, K, V) + running_scores[:, :, None]).view(B, K * V)
        if config.do_sample:
            picked = torch.multinomial(total.softmax(dim=-1), keep, generator=generator)
            top_scores = total.gather(1, picked)
        else:
            top_scores, picked = torch.topk(total, keep)
        parent, token = picked // V, picked % V  # (B, keep): which beam each continuation extends
        top_seqs = _gather(running, parent)
        top_seqs[:, :, length] = token
        top_origin = _gather(running_origin, parent)
        top_origin[:, :, length - T] = parent + torch.arange(B, device=device)[:, None] * K
        hits = should_stop(top_seqs[:, :, :length + 1].reshape(B * keep, -1), token.reshape(-1)).view(B, keep)
        hits |= length + 1 >= max_length
        # The K best continuations that did not stop keep running.
        live_scores = top_scores + hits.float() * -1e9
        best = torch.topk(live_scores, K).indices
        running, running_scores, running_origin = _gather(top_seqs, best), _gather(live_scores, best), \
            _gather(top_origin, best)
        done = done.merge(top_seqs, top_scores, top_origin, hits & in_top_k, length + 1 - T, improvable, config)
        engine.reorder(running_origin[:, :, length - T].reshape(-1))
        improvable = _improvable(improvable, running_scores, done, length + 1 - T, config)
        all_done = bool(done.finished.all()) and config.early_stopping is True
        if not bool(improvable.any()) or all_done or bool(hits.all()):
            break
        logits = engine.step(running[:, :, length].reshape(-1))
    return done.best(config.num_return_sequences, T)


class _Finished:
    """The K best finished hypotheses per prompt: sequences (B, K, L), scores (B, K), origins, flags."""

    def __init__(self, sequences, scores, origin, finished) -> None:
        self.sequences, self.scores, self.origin, self.finished = sequences, scores, origin, finished

    def merge(self, top_seqs, top_scores, top_origin, just_finished, new_length: int, improvable,
              config: GenerationConfig) -> "_Finished":
        """Add the candidates that just finished (among the first K) if they beat the current ones."""
        scores = top_scores / (new_length ** config.length_penalty)
        full = self.finished.all(-1, keepdim=True) & (config.early_stopping is True)
        scores = scores + full.float() * -1e9 + (~improvable).float() * -1e9 + (~just_finished).float() * -1e9
        merged_scores = torch.cat((self.scores, scores), dim=1)
        best = torch.topk(merged_scores, self.scores.shape[1]).indices
        return _Finished(_gather(torch.cat((self.sequences, top_seqs), 1), best), _gather(merged_scores, best),
                         _gather(torch.cat((self.origin, top_origin), 1), best),
                         _gather(torch.cat((self.finished, just_finished), 1), best))

    def best(self, n: int, prompt_length: int) -> torch.Tensor:
        """(B * n, T + longest generated) sequences of the n best hypotheses per prompt."""
        sequences = self.sequences[:, :n].flatten(0, 1)
        generated = (self.origin[:, :n].flatten(0, 1) + 1).bool().sum(dim=1).max()
        return sequences[:, :prompt_length + int(generated)]


def _improvable(improvable: torch.Tensor, running_scores: torch.Tensor, done: _Finished, new_length: int,
                config: GenerationConfig) -> torch.Tensor:
    """Can the best running beam still beat the worst finished one? (B, 1). With early_stopping=False the
    running beam is judged at its current length; with "never" and a positive length penalty, at the
    longest length it could reach."""
    length = config.max_new_tokens if config.early_stopping == "never" and config.length_penalty > 0 else new_length
    best_possible = running_scores[:, :1] / (length ** config.length_penalty)
    worst_finished = torch.where(done.finished, done.scores.min(dim=1, keepdim=True).values, -1.0e9)
    return improvable & (best_possible > worst_finished).any(dim=-1, keepdim=True)


def _gather(tensor: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Pick along dim 1 (the beam axis): tensor (B, N, ...), index (B, M) -> (B, M, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)
