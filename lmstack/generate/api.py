"""``generate`` and ``stream``: continue prompts with any strategy of GenerationConfig.

    from lmstack.generate import generate, GenerationConfig
    out = generate(model, input_ids, GenerationConfig(max_new_tokens=50, num_beams=4))  # (B, T + new)
"""

import dataclasses
from dataclasses import dataclass
from typing import Iterator, Protocol

import torch
from torch import nn

from lmstack.errors import ConfigError
from lmstack.generate.config import GenerationConfig
from lmstack.generate.engine import CausalLMEngine, Seq2SeqEngine
from lmstack.generate.processors import LogitsPipeline
from lmstack.generate.search import StopCheck, beam_search, sample_tokens


class Detokenizer(Protocol):
    """What generation needs from a tokenizer: ids -> text."""

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


@dataclass
class _Run:
    """Everything one generation call needs, prepared and validated."""

    config: GenerationConfig
    input_ids: torch.Tensor  # (rows, T): prompts expanded for beams / multiple samples
    engine: CausalLMEngine | Seq2SeqEngine
    process: LogitsPipeline
    should_stop: StopCheck
    generator: torch.Generator | None


def generate(model: nn.Module, input_ids: torch.Tensor, config: GenerationConfig | None = None,
             attention_mask: torch.Tensor | None = None, *, tokenizer: Detokenizer | None = None,
             return_logprobs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Continue each prompt.

    Args:
        model: a decoder-only lmstack model, or an encoder-decoder (anything with ``encode``).
        input_ids: (B, T) prompt ids; rows of different lengths are left-padded. For an encoder-decoder
            these are the source ids (padding on either side, as the mask says).
        config: decoding options (default: greedy, 20 new tokens).
        attention_mask: (B, T), 1 for real tokens, 0 for padding.
        tokenizer: needed only for ``stop_strings``.
        return_logprobs: also return the (B * num_return_sequences, generated) log-probability of each new
            token under the distribution it was drawn from (greedy / sampling only): what an RL rollout
            needs, without a second forward pass.
    Returns:
        (B * num_return_sequences, T + generated) token ids: the prompt, then the new tokens; rows that
        finished early are filled with ``pad_token_id``. Generation stops early when every row is done.
        For an encoder-decoder, the decoder's ids instead: the decoder start token, then the new tokens
        (what transformers returns for this kind of model).
    Raises:
        ConfigError: invalid options, an empty prompt, or prompt + max_new_tokens beyond the context.
    """
    run = _prepare(model, input_ids, config, attention_mask, tokenizer)
    if run.config.num_beams > 1:
        if return_logprobs:
            raise ConfigError("return_logprobs is for greedy decoding and sampling, not beam search")
        return beam_search(run.engine, run.input_ids, run.config, run.process, run.should_stop, run.generator)
    logprobs: list | None = [] if return_logprobs else None
    new_tokens = list(sample_tokens(run.engine, run.input_ids, run.config, run.process, run.should_stop,
                                    run.generator, logprobs))
    out = torch.cat([run.input_ids, torch.stack(new_tokens, dim=1)], dim=1)
    return (out, torch.stack(logprobs, dim=1)) if return_logprobs else out


def stream(model: nn.Module, input_ids: torch.Tensor, config: GenerationConfig | None = None,
           attention_mask: torch.Tensor | None = None, *, tokenizer: Detokenizer | None = None,
           skip_special_tokens: bool = False) -> Iterator[torch.Tensor] | Iterator[str]:
    """Like ``generate`` (greedy or sampling), but yield as tokens are produced.

    Without a tokenizer: yields the new token of every row, a (B,) tensor, per step. With a tokenizer
    (one prompt): yields the text each token adds, holding back a partial UTF-8 character until it is
    complete; the end-of-sequence token itself is not shown, nor are special tokens with
    ``skip_special_tokens``.
    """
    run = _prepare(model, input_ids, config, attention_mask, tokenizer)
    if run.config.num_beams > 1:
        raise ConfigError("streaming supports greedy decoding and sampling, not beam search (num_beams > 1)")
    tokens = sample_tokens(run.engine, run.input_ids, run.config, run.process, run.should_stop, run.generator)
    if tokenizer is None:
        return tokens
    if run.input_ids.shape[0] != 1:
        raise ConfigError("text streaming takes one prompt and one sequence; stream token ids for batches")
    return text_deltas((int(t[0]) for t in tokens), tokenizer, set(run.config.eos_ids()), skip_special_tokens)


def text_deltas(token_ids: Iterator[int], tokenizer: Detokenizer, stop_ids: set[int],
                skip_special_tokens: bool = False) -> Iterator[str]:
    """Turn a stream of token ids into the text each one adds (a token can end mid-character)."""
    ids: list[int] = []
    shown = ""
    for token in token_ids:
        if token in stop_ids:
            break
        ids.append(token)
        text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character is still incomplete: wait for its next byte
        if text.startswith(shown) and len(text) > len(shown):
            yield text[len(shown):]
        shown = text
    text = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    if len(text) > len(shown) and text.startswith(shown):
        yield text[len(shown):]


def _prepare(model: nn.Module, input_ids: torch.Tensor, config: GenerationConfig | None,
             attention_mask: torch.Tensor | None, tokenizer: Detokenizer | None) -> _Run:
    config = _resolve(model, config or GenerationConfig(), tokenizer)
    _check_prompt(model, input_ids, attention_mask, config)
    copies = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    if copies > 1:
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        attention_mask = attention_mask.repeat_interleave(copies, dim=0) if attention_mask is not None else None
    skip_before = (attention_mask != 0).int().argmax(dim=1) if attention_mask is not None else None
    n_eos = len(config.eos_ids())
    keep = (n_eos + 1 if n_eos else 2) if config.num_beams > 1 and config.do_sample else 1
    generator = None
    if config.seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(config.seed)
    if hasattr(model, "encode"):
        # Encoder-decoder: the search runs over decoder ids, which begin with the start token.
        start = _decoder_start(model, input_ids)
        engine = Seq2SeqEngine(model, input_ids, attention_mask, start, config.max_new_tokens)
        input_ids, skip_before = start, None
    else:
        engine = CausalLMEngine(model, input_ids, attention_mask, config.max_new_tokens)
    return _Run(config, input_ids, engine, LogitsPipeline(config, input_ids.shape[1], skip_before, keep),
                _stop_check(config, tokenizer, input_ids.shape[1], input_ids.device), generator)


def _decoder_start(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """(rows, 1) filled with the model's decoder start token."""
    start = getattr(model.config, "decoder_start_token_id", None)
    if start is None:
        raise ConfigError("the model config has no decoder_start_token_id to begin decoding with")
    return torch.full((input_ids.shape[0], 1), start, dtype=torch.long, device=input_ids.device)


def _resolve(model: nn.Module, config: GenerationConfig, tokenizer: Detokenizer | None) -> GenerationConfig:
    """Fill eos/pad from the model config (pad falls back to the first eos id), then validate."""
    model_config = getattr(model, "config", None)
    eos = config.eos_token_id if config.eos_token_id is not None else getattr(model_config, "eos_token_id", None)
    pad = config.pad_token_id if config.pad_token_id is not None else getattr(model_config, "pad_token_id", None)
    config = dataclasses.replace(config, eos_token_id=eos, pad_token_id=pad)
    if pad is None and config.eos_ids():
        config.pad_token_id = config.eos_ids()[0]
    config.validate()
    if config.stop_list() and tokenizer is None:
        raise ConfigError("stop_strings needs a tokenizer to read the generated text: pass tokenizer=")
    if config.pad_token_id is None and config.stop_list():
        raise ConfigError("stop_strings needs pad_token_id (or eos_token_id) to fill finished rows")
    return config


def _check_prompt(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  config: GenerationConfig) -> None:
    if input_ids.dim() != 2:
        raise ConfigError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if B == 0 or T == 0:
        raise ConfigError("empty prompt: generation needs at least one token per row")
    if attention_mask is not None:
        if tuple(attention_mask.shape) != (B, T):
            raise ConfigError(f"attention_mask shape {tuple(attention_mask.shape)} does not match input_ids {(B, T)}")
        empty = (attention_mask.sum(dim=1) == 0).nonzero().flatten().tolist()
        if empty:
            raise ConfigError(f"empty prompt: rows {empty} of attention_mask hold no real token")
    limit = getattr(model.config, "context_limit", None)
    if limit is not None and T + config.max_new_tokens > limit:
        raise ConfigError(f"prompt of {T} tokens + max_new_tokens={config.max_new_tokens} exceeds the model's "
                          f"context window of {limit} tokens")


def _stop_check(config: GenerationConfig, tokenizer: Detokenizer | None, prompt_length: int,
                device: torch.device) -> StopCheck:
    """A row stops on an EOS token, or once its new text contains a stop string."""
    eos = torch.tensor(config.eos_ids(), dtype=torch.long, device=device)
    stops = config.stop_list()

    def should_stop(sequences: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        hit = torch.isin(tokens, eos) if eos.numel() else torch.zeros_like(tokens, dtype=torch.bool)
        if stops:
            texts = [tokenizer.decode(row[prompt_length:].tolist()) for row in sequences]
            hit |= torch.tensor([any(s in text for s in stops) for text in texts], device=device)
        return hit

    return should_stop
