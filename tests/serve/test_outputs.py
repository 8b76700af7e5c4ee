"""Choices: text decoded incrementally (a short window per token) equals decoding the whole reply, multi-byte
characters are held back until complete, and stop strings cut the text whether streamed or not."""

import random

import pytest

from lmstack.serve.outputs import Choice
from lmstack.serve.sampling import Sample
from lmstack.serve.scheduler import StepOutput
from lmstack.tokenizers import train_bpe
from tests.tokenizers.corpus import TRAIN


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(TRAIN * 2 + ["naïve café — 東京 🙂 déjà vu"] * 3, 400, special_tokens=["<|im_end|>"])


def _feed(choice, ids, finish="length"):
    pieces = []
    for k, token in enumerate(ids):
        choice.add(StepOutput(0, Sample(token), finish if k == len(ids) - 1 else None))
        pieces.append(choice.delta())
        if choice.stopped_by_string:
            break
    return pieces


@pytest.mark.parametrize("seed", range(5))
def test_incremental_text_equals_decoding_the_whole_reply(tokenizer, seed):
    rng = random.Random(seed)
    text = "naïve café — 東京 🙂 déjà vu, " + " ".join(rng.choice(TRAIN).split()[:12])
    ids = tokenizer.encode(text, add_special_tokens=False)
    ids += [rng.randrange(tokenizer.vocab_size) for _ in range(20)]  # random bytes: broken characters too
    choice = Choice(0, tokenizer)
    pieces = _feed(choice, ids)
    assert "".join(pieces) == choice.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_character_split_over_tokens_is_held_back(tokenizer):
    ids = tokenizer.encode("a🙂", add_special_tokens=False)
    assert len(ids) >= 3  # the emoji's four bytes span several tokens
    choice = Choice(0, tokenizer)
    pieces = _feed(choice, ids, finish="stop")
    assert "".join(pieces) == "a🙂" and all("\ufffd" not in p for p in pieces)
    assert "" in pieces  # some tokens added no text yet


def test_stop_strings_cut_streamed_and_whole_text_alike(tokenizer):
    ids = tokenizer.encode("To be, or not to be: that is the question", add_special_tokens=False)
    streamed = Choice(0, tokenizer, stop=["not to"])
    pieces = _feed(streamed, ids)
    assert "".join(pieces) == streamed.text == "To be, or "
    assert streamed.finish_reason == "stop" and streamed.stopped_by_string
