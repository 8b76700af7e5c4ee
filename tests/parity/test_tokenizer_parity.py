"""Byte-level BPE against the reference `tokenizers` library, both directions, identical ids."""

import random

import pytest

from lmstack.tokenizers import load_tokenizer, train_bpe
from lmstack.tokenizers.pretokenize import CL100K_PATTERN
from tests.tokenizers.corpus import HELD_OUT, TRAIN

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

SPECIAL = "<|endoftext|>"


def _reference(style: str):
    """A tokenizer trained by the reference library: GPT-2 style, or Llama-3 style (NFC, Split + ByteLevel,
    BOS template, ignore_merges)."""
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    if style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=700, special_tokens=[SPECIAL, "<|begin|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TRAIN * 3, trainer)
    if style == "llama3":
        tok.post_processor = processors.TemplateProcessing(single="<|begin|> $A", special_tokens=[("<|begin|>", 1)])
    return tok


@pytest.fixture(params=["gpt2", "llama3"], scope="module")
def pair(request, tmp_path_factory):
    ref = _reference(request.param)
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    ref.save(str(path))
    return ref, load_tokenizer(path)


@pytest.mark.parametrize("text", HELD_OUT, ids=range(len(HELD_OUT)))
def test_reference_trained_tokenizer_encodes_identically(pair, text):
    ref, ours = pair
    for add_special in (True, False):
        want = ref.encode(text, add_special_tokens=add_special).ids
        assert ours.encode(text, add_special_tokens=add_special) == want
    ids = ref.encode(text).ids
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=False)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("pattern", ["gpt2", "cl100k"])
def test_lmstack_trained_tokenizer_loads_in_the_reference(pattern, tmp_path):
    ours = train_bpe(TRAIN * 3, 600, special_tokens=[SPECIAL],
                     **({} if pattern == "gpt2" else {"pattern": CL100K_PATTERN}))
    ours.save(tmp_path)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in HELD_OUT + TRAIN:
        assert ref.encode(text).ids == ours.encode(text)
        assert ref.decode(ours.encode(text), skip_special_tokens=False) == text
    assert load_tokenizer(tmp_path).encode(HELD_OUT[0]) == ours.encode(HELD_OUT[0])


def test_vocab_json_and_merges_txt(tmp_path):
    """GPT-2's original two-file format reads to the same tokenizer as its tokenizer.json."""
    ref = _reference("gpt2")
    ref.save(str(tmp_path / "tokenizer.json"))
    ours = load_tokenizer(tmp_path / "tokenizer.json")
    files = ref.model.save(str(tmp_path))
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == ["merges.txt", "vocab.json"]
    from_files = load_tokenizer(tmp_path)
    for text in HELD_OUT:
        assert from_files.encode(text) == ours.encode(text)


def test_random_unicode_round_trips():
    ours = train_bpe(TRAIN, 400)
    rng = random.Random(0)
    alphabet = [chr(c) for c in range(0x20, 0x250)] + ["🙂", "\u200d", "\u0301", "中", "\n", "\t", "\x00", "👨‍👩‍👧"]
    for _ in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        assert ours.decode(ours.encode(text)) == text
