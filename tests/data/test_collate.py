"""Collators of the denoising objectives: masking rates and 80/10/10 split, whole words, sentence pairs,
and T5 span corruption (lengths as T5 computes them; inputs + targets give back the original block)."""

import torch

from lmstack.data.collate import (IGNORE_INDEX, MaskedLMCollator, SpanCorruptionCollator, random_spans_noise_mask,
                                  span_corruption_lengths)

CLS, SEP, MASK, PAD, V = 1, 2, 3, 0, 1000


def _blocks(B=64, L=126, seed=0):
    return torch.randint(10, V, (B, L), generator=torch.Generator().manual_seed(seed))


def test_masked_lm_rates_and_replacements():
    blocks = _blocks()
    batch = MaskedLMCollator(CLS, SEP, MASK, V, special_ids=(PAD,))(blocks, torch.Generator().manual_seed(1))
    ids, labels = batch["input_ids"], batch["labels"]
    assert ids.shape == (64, 128) and bool((ids[:, 0] == CLS).all()) and bool((ids[:, -1] == SEP).all())
    chosen = labels != IGNORE_INDEX
    assert not bool(chosen[:, 0].any() or chosen[:, -1].any())  # specials are never chosen
    assert 0.13 < chosen.float().mean() * 128 / 126 < 0.17
    original = torch.cat([torch.full((64, 1), CLS), blocks, torch.full((64, 1), SEP)], 1)
    assert torch.equal(labels[chosen], original[chosen])
    as_mask = (ids[chosen] == MASK).float().mean()
    kept = (ids[chosen] == original[chosen]).float().mean()
    assert 0.76 < as_mask < 0.84 and 0.07 < kept < 0.13
    assert torch.equal(ids[~chosen], original[~chosen])


def test_whole_word_masking_masks_every_piece_of_a_word():
    starts = torch.zeros(V, dtype=torch.bool)
    starts[10:500] = True  # ids 10..499 start words, 500.. continue them
    collate = MaskedLMCollator(CLS, SEP, MASK, V, probability=0.3, word_starts=starts)
    blocks = _blocks(16, 60)
    labels = collate(blocks, torch.Generator().manual_seed(2))["labels"][:, 1:-1]
    chosen = labels != IGNORE_INDEX
    for row, picked in zip(blocks, chosen):
        word = starts[row].long().cumsum(0)
        for w in word.unique():
            in_word = picked[word == w]
            assert bool(in_word.all()) or not bool(in_word.any())  # all pieces or none
    assert 0.2 < chosen.float().mean() < 0.4


def test_next_sentence_pairs():
    blocks = _blocks(200, 40)
    batch = MaskedLMCollator(CLS, SEP, MASK, V, next_sentence=True)(blocks, torch.Generator().manual_seed(3))
    ids, types, is_random = batch["input_ids"], batch["token_type_ids"], batch["next_sentence_label"]
    assert ids.shape == (200, 43)
    cut = int((ids[0] == SEP).nonzero()[0]) - 1  # [CLS] A (cut tokens) [SEP]
    assert bool((types[:, :cut + 2] == 0).all()) and bool((types[:, cut + 2:] == 1).all())
    assert 0.4 < is_random.float().mean() < 0.6
    labels = batch["labels"]
    restored = torch.where(labels != IGNORE_INDEX, labels, ids)[:, cut + 2:-1]
    follows = (restored == blocks[:, cut:]).all(dim=1)
    assert torch.equal(follows, is_random == 0)


def test_noise_mask_counts_follow_t5():
    for length in (20, 64, 114, 512):
        mask = random_spans_noise_mask(length, 0.15, 3.0, torch.Generator().manual_seed(length))
        n_in, n_out, n_spans = span_corruption_lengths(length)
        assert mask.shape == (length,) and not bool(mask[0])  # starts with a non-noise span
        assert int(mask.sum()) + n_spans + 1 == n_out
        starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])
        assert int(starts.sum()) == n_spans
    assert span_corruption_lengths(512) == (512 - 77 + 26 + 1, 77 + 26 + 1, 26)  # T5: 15% of 512, spans of 3


def test_span_corruption_round_trip():
    sentinels = tuple(range(999, 979, -1))  # <extra_id_0> = 999, <extra_id_1> = 998, ...
    collate = SpanCorruptionCollator(sentinels, eos_id=1)
    blocks = torch.randint(10, 900, (8, 64), generator=torch.Generator().manual_seed(4))
    batch = collate(blocks, torch.Generator().manual_seed(5))
    n_in, n_out, _ = span_corruption_lengths(64)
    assert batch["input_ids"].shape == (8, n_in) and batch["labels"].shape == (8, n_out)
    for inputs, targets, original in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), blocks.tolist()):
        assert inputs[-1] == 1 and targets[-1] == 1 and targets[0] == sentinels[0]
        spans, current = {}, None
        for t in targets[:-1]:
            if t in sentinels:
                current = t
                spans[t] = []
            else:
                spans[current].append(t)
        rebuilt = [x for t in inputs[:-1] for x in (spans[t] if t in sentinels else [t])]
        assert rebuilt == original
