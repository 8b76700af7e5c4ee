"""Collators: turn packed token blocks into the batches of the encoder pretraining objectives.

Masked LM (BERT, Devlin et al. 2018): choose 15% of the non-special tokens (or, with whole-word
masking, of the words, and then every piece of each chosen word); of those, 80% become [MASK], 10% a
random token, 10% stay as they are; only chosen positions are scored (labels elsewhere IGNORE_INDEX).
Next-sentence pairs: cut each block in two at a random point; half the time the second part is
replaced by text from another block (label 1 = random, 0 = continuation), as BertForPreTraining scores.
Span corruption (T5, Raffel et al. 2020 section 3.1.4): replace random spans (noise density 0.15, mean
span length 3) by sentinel tokens <extra_id_0>, <extra_id_1>, ...; the targets are each sentinel
followed by the tokens it hid, then EOS. Shapes: B rows, L block length.
"""

from dataclasses import dataclass

import torch

IGNORE_INDEX = -100  # label of an unscored position (PyTorch's cross-entropy default); the one definition


@dataclass
class MaskedLMCollator:
    """[CLS] block [SEP] (or [CLS] A [SEP] B [SEP] with ``next_sentence``) with masked-LM labels.

    Attributes:
        cls_id, sep_id, mask_id: special-token ids; vocab_size: range of random replacements.
        special_ids: ids never masked (besides cls/sep).
        probability: share of tokens (or words) chosen for prediction.
        word_starts: (V,) bool, True where a token id begins a word: enables whole-word masking.
        next_sentence: build sentence pairs with a ``next_sentence_label``.
    """

    cls_id: int
    sep_id: int
    mask_id: int
    vocab_size: int
    special_ids: tuple[int, ...] = ()
    probability: float = 0.15
    word_starts: torch.Tensor | None = None
    next_sentence: bool = False

    def __call__(self, blocks: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """blocks: (B, L) token ids -> input_ids, token_type_ids, attention_mask, labels (B, L + 2 or + 3)
        and, with next_sentence, next_sentence_label (B,)."""
        batch = self._pairs(blocks, generator) if self.next_sentence else self._singles(blocks)
        chosen = self._choose(batch["input_ids"], generator)
        batch["labels"] = torch.where(chosen, batch["input_ids"], IGNORE_INDEX)
        batch["input_ids"] = self._corrupt(batch["input_ids"], chosen, generator)
        return batch

    def _singles(self, blocks: torch.Tensor) -> dict[str, torch.Tensor]:
        B = blocks.shape[0]
        ids = torch.cat([blocks.new_full((B, 1), self.cls_id), blocks, blocks.new_full((B, 1), self.sep_id)], 1)
        return {"input_ids": ids, "token_type_ids": torch.zeros_like(ids), "attention_mask": torch.ones_like(ids)}

    def _pairs(self, blocks: torch.Tensor, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
        B, L = blocks.shape
        if L < 2:
            raise ValueError("next-sentence pairs need blocks of at least 2 tokens")
        cut = int(torch.randint(1, L, (1,), generator=generator))  # one cut per batch keeps rows equal length
        is_random = torch.rand(B, generator=generator) < 0.5
        # a random second part: the same slice of another row (a shift by 1..B-1 never picks the row itself)
        shift = torch.randint(1, B, (1,), generator=generator) if B > 1 else torch.zeros(1, dtype=torch.long)
        others = blocks.roll(int(shift), dims=0)
        second = torch.where(is_random[:, None] & (B > 1), others[:, cut:], blocks[:, cut:])
        cls_ = blocks.new_full((B, 1), self.cls_id)
        sep = blocks.new_full((B, 1), self.sep_id)
        ids = torch.cat([cls_, blocks[:, :cut], sep, second, sep], dim=1)
        types = torch.zeros_like(ids)
        types[:, cut + 2:] = 1
        return {"input_ids": ids, "token_type_ids": types, "attention_mask": torch.ones_like(ids),
                "next_sentence_label": (is_random & (B > 1)).long()}

    def _choose(self, ids: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """(B, T) bool: the positions to predict."""
        special = torch.isin(ids, torch.tensor([self.cls_id, self.sep_id, *self.special_ids]))
        if self.word_starts is None:
            chosen = torch.rand(ids.shape, generator=generator) < self.probability
            return chosen & ~special
        starts = self.word_starts[ids] | special  # a special token also ends the word before it
        word = starts.long().cumsum(dim=1)  # (B, T) word number within the row
        pick = torch.rand(ids.shape, generator=generator) < self.probability  # one draw per word start
        word_chosen = torch.zeros(ids.shape[0], ids.shape[1] + 1, dtype=torch.long).scatter_add(
            1, word, (pick & starts).long()) > 0
        return word_chosen.gather(1, word) & ~special

    def _corrupt(self, ids: torch.Tensor, chosen: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """80% of chosen -> [MASK], 10% -> a random token, 10% unchanged."""
        roll = torch.rand(ids.shape, generator=generator)
        random_ids = torch.randint(0, self.vocab_size, ids.shape, generator=generator)
        out = torch.where(chosen & (roll < 0.8), self.mask_id, ids)
        return torch.where(chosen & (roll >= 0.8) & (roll < 0.9), random_ids, out)


def random_spans_noise_mask(length: int, noise_density: float, mean_span_length: float,
                            generator: torch.Generator | None = None) -> torch.Tensor:
    """T5's noise mask (length,) bool: about ``noise_density * length`` noise tokens in spans whose mean
    length is ``mean_span_length``, alternating with non-noise spans and starting with non-noise.

    The counts follow the T5 reference exactly (so the corrupted lengths are a function of ``length``);
    the span boundaries are a random segmentation of those counts.
    """
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(min(n_noise, length - n_noise) / mean_span_length)), 1)

    def segment_lengths(n_items: int) -> torch.Tensor:
        # n_spans random positive parts of n_items: choose n_spans - 1 cut points among n_items - 1 gaps.
        cuts = torch.randperm(n_items - 1, generator=generator)[:n_spans - 1].sort().values + 1
        edges = torch.cat([torch.tensor([0]), cuts, torch.tensor([n_items])])
        return edges.diff()

    lengths = torch.stack([segment_lengths(length - n_noise), segment_lengths(n_noise)], dim=1).flatten()
    is_noise = torch.arange(2 * n_spans).remainder(2).bool()
    return torch.repeat_interleave(is_noise, lengths)


def span_corruption_lengths(length: int, noise_density: float = 0.15, mean_span_length: float = 3.0) -> tuple[int, int, int]:
    """(input length, target length, number of spans) after corrupting a block of ``length`` tokens."""
    n_noise = min(max(int(round(length * noise_density)), 1), length - 1)
    n_spans = max(int(round(min(n_noise, length - n_noise) / mean_span_length)), 1)
    return length - n_noise + n_spans + 1, n_noise + n_spans + 1, n_spans


@dataclass
class SpanCorruptionCollator:
    """T5 span corruption of fixed-length blocks.

    Attributes:
        sentinel_ids: id of <extra_id_0>, <extra_id_1>, ... in that order (at least one per span).
        eos_id: appended to inputs and targets.
        noise_density, mean_span_length: T5's 0.15 and 3.
    """

    sentinel_ids: tuple[int, ...]
    eos_id: int
    noise_density: float = 0.15
    mean_span_length: float = 3.0

    def __call__(self, blocks: torch.Tensor, generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """blocks: (B, L) -> input_ids (B, L_in), attention_mask (B, L_in), labels (B, L_out), where
        ``span_corruption_lengths(L)`` gives L_in and L_out (the same for every row)."""
        _, _, n_spans = span_corruption_lengths(blocks.shape[1], self.noise_density, self.mean_span_length)
        if n_spans > len(self.sentinel_ids):
            raise ValueError(f"blocks of {blocks.shape[1]} tokens need {n_spans} sentinel tokens, "
                             f"the tokenizer has {len(self.sentinel_ids)}")
        inputs, targets = [], []
        for row in blocks:
            noise = random_spans_noise_mask(len(row), self.noise_density, self.mean_span_length, generator)
            inputs.append(self._keep(row, noise))
            targets.append(self._keep(row, ~noise))
        input_ids = torch.stack(inputs)
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": torch.stack(targets)}

    def _keep(self, row: torch.Tensor, dropped: torch.Tensor) -> torch.Tensor:
        """Replace each run of ``dropped`` tokens by the next sentinel, then append EOS."""
        span_start = dropped & ~torch.cat([torch.tensor([False]), dropped[:-1]])
        span_number = span_start.long().cumsum(0) - 1
        sentinels = torch.tensor(self.sentinel_ids, dtype=row.dtype)
        out = torch.where(span_start, sentinels[span_number.clamp_min(0)], row)
        keep = ~dropped | span_start
        return torch.cat([out[keep], torch.tensor([self.eos_id], dtype=row.dtype)])


def whole_windows(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Packed (inputs, targets), each (B, L - 1), back to the (B, L) windows they were cut from."""
    return torch.cat([inputs, targets[:, -1:]], dim=1)


class CollatedBatches:
    """Packed blocks passed through a collator: ``next_batch()`` gives the collated dict; the position is
    the blocks' (masking draws from torch's global generator, which checkpoints save and restore)."""

    def __init__(self, blocks, collate) -> None:
        self.blocks, self.collate = blocks, collate

    def next_batch(self) -> dict[str, torch.Tensor]:
        return self.collate(whole_windows(*self.blocks.next_batch()))

    def state_dict(self) -> dict:
        return self.blocks.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.blocks.load_state_dict(state)
