"""The pretraining objectives of `lmstack pretrain`, each as (special tokens, model head, collator, loss).

    causal_lm        decoder presets: next-token prediction on packed blocks
    masked_lm        encoder presets: [CLS] block [SEP], 15% masked (80/10/10), optional whole-word masking
    mlm_nsp          encoder presets: [CLS] A [SEP] B [SEP], masked LM + next-sentence prediction
    span_corruption  encoder-decoder presets: T5 spans -> sentinels, targets rebuilt by the decoder
"""

import dataclasses
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from lmstack.data.collate import (CollatedBatches, MaskedLMCollator, SpanCorruptionCollator, span_corruption_lengths,
                                  whole_windows)
from lmstack.errors import ConfigError
from lmstack.models import DecoderConfig, EncoderConfig, EncoderDecoderConfig
from lmstack.train import CausalLMObjective
from lmstack.train.denoising import MaskedLMObjective, SpanCorruptionObjective

MLM_SPECIALS = ("[PAD]", "[CLS]", "[SEP]", "[MASK]")
PAD_TOKEN = "<pad>"
EVAL_SEED = 1234  # held-out masking is drawn the same way at every evaluation


def sentinel_token(i: int) -> str:
    return f"<extra_id_{i}>"


def special_tokens_for(objective: str, block_size: int) -> list[str]:
    """Special tokens a trained tokenizer needs for ``objective`` (besides the EOS token)."""
    if objective in ("masked_lm", "mlm_nsp"):
        return list(MLM_SPECIALS)
    if objective == "span_corruption":
        _, _, n_spans = span_corruption_lengths(block_size)
        return [PAD_TOKEN] + [sentinel_token(i) for i in range(n_spans)]
    return []


_KINDS = {"masked_lm": EncoderConfig, "mlm_nsp": EncoderConfig, "span_corruption": EncoderDecoderConfig,
          "causal_lm": DecoderConfig}


def check_model_kind(config, objective: str) -> None:
    """ConfigError unless ``config`` is the model kind ``objective`` trains."""
    if objective not in _KINDS:
        raise ConfigError(f"unknown objective {objective!r}; expected one of {sorted(_KINDS)}")
    if not isinstance(config, _KINDS[objective]):
        want, got = (c.__name__.removesuffix("Config") for c in (_KINDS[objective], type(config)))
        article = "an" if want[0] in "AEIOU" else "a"
        raise ConfigError(f"objective={objective!r} trains {article} {want} model (preset or checkpoint); this one is "
                          f"a {got}")


def model_for_objective(preset, objective: str, overrides: dict, vocab_size: int):
    """The preset's config with the head the objective trains and the size overrides that apply."""
    check_model_kind(preset, objective)
    known = {f.name for f in dataclasses.fields(preset)}
    unknown = sorted(k for k in overrides if k not in known)
    if unknown:
        raise ConfigError(f"model.{unknown[0]} does not apply to a {type(preset).__name__} preset")
    changes = dict(overrides, vocab_size=vocab_size)
    if objective in ("masked_lm", "mlm_nsp"):
        changes["head"] = "masked_lm" if objective == "masked_lm" else "pretraining"
    return dataclasses.replace(preset, **changes)


@dataclass
class Task:
    """How one objective reads packed blocks: their raw length, the loss and the batch collation."""

    objective: Callable
    raw_block: int  # tokens read from the shards per row
    collate: Callable | None = None

    def train_data(self, blocks):
        return blocks if self.collate is None else CollatedBatches(blocks, self.collate)

    def eval_batches(self, batches: Iterable) -> Iterator:
        if self.collate is None:
            yield from batches
            return
        generator = torch.Generator().manual_seed(EVAL_SEED)
        for inputs, targets in batches:
            yield self.collate(whole_windows(inputs, targets), generator)


def denoising_task(objective: str, tokenizer, eos_id: int, config, block_size: int, mask_probability: float,
                   whole_word: bool) -> Task:
    """The Task for ``objective`` over a model with ``config``; ``block_size`` is the model's input length."""
    check_model_kind(config, objective)
    if objective == "causal_lm":  # held-out bits per byte need each token's UTF-8 length
        token_bytes = torch.tensor(tokenizer.byte_lengths() + [0] * (config.vocab_size - tokenizer.vocab_size))
        return Task(CausalLMObjective(token_bytes), block_size)
    ids = {t: tokenizer.token_to_id(t) for t in (*MLM_SPECIALS, PAD_TOKEN)}
    if objective in ("masked_lm", "mlm_nsp"):
        missing = [t for t in MLM_SPECIALS if ids[t] is None]
        if missing:
            raise ConfigError(f"objective={objective!r} needs the special tokens {missing} in the tokenizer")
        if not 0 < mask_probability < 1:
            raise ConfigError(f"mask_probability={mask_probability} must be in (0, 1)")
        heads = ("pretraining",) if objective == "mlm_nsp" else ("masked_lm", "pretraining")
        if config.head not in heads:
            raise ConfigError(f"objective={objective!r} needs a model with head {' or '.join(heads)}; this "
                              f"checkpoint's head is {config.head!r}")
        extra = 3 if objective == "mlm_nsp" else 2  # [CLS] ... [SEP] (... [SEP])
        if block_size > config.max_seq_len:
            raise ConfigError(f"data.block_size={block_size} exceeds the model's max_seq_len={config.max_seq_len}")
        collate = MaskedLMCollator(ids["[CLS]"], ids["[SEP]"], ids["[MASK]"], tokenizer.vocab_size,
                                   special_ids=(ids["[PAD]"], eos_id), probability=mask_probability,
                                   word_starts=word_starts(tokenizer) if whole_word else None,
                                   next_sentence=objective == "mlm_nsp")
        return Task(MaskedLMObjective(), block_size - extra, collate)
    if objective == "span_corruption":
        _, _, n_spans = span_corruption_lengths(block_size)
        sentinels = [tokenizer.token_to_id(sentinel_token(i)) for i in range(n_spans)]
        if None in sentinels or ids[PAD_TOKEN] is None:
            raise ConfigError(f"span corruption of {block_size}-token blocks needs <pad> and {n_spans} sentinel "
                              "tokens <extra_id_0>.. in the tokenizer")
        config.pad_token_id = config.decoder_start_token_id = ids[PAD_TOKEN]
        config.eos_token_id = eos_id
        return Task(SpanCorruptionObjective(), block_size, SpanCorruptionCollator(tuple(sentinels), eos_id))
    raise ConfigError(f"unknown objective {objective!r}")


def word_starts(tokenizer) -> torch.Tensor:
    """(V,) bool: token ids that begin a word (byte-level BPE: a leading space, 'Ġ'; WordPiece: no '##')."""
    starts = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for token, i in tokenizer.vocab.items():
        starts[i] = not token.startswith("##") if hasattr(tokenizer, "continuing_subword_prefix") \
            else token.startswith("Ġ") or not token[:1].isalnum()
    return starts
