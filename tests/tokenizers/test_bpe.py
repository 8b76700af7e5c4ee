"""Byte-level BPE behaviour: training, special tokens, errors."""

import json

import pytest

from lmstack.tokenizers import TokenizerError, load_tokenizer, train_bpe
from tests.tokenizers.corpus import TRAIN


def test_training_reaches_the_vocabulary_size_and_merges_frequent_pairs():
    tok = train_bpe(TRAIN * 2, 500, special_tokens=["<|endoftext|>"])
    assert tok.vocab_size == 500 and len(set(tok.vocab.values())) == 500
    assert tok.vocab["<|endoftext|>"] == 0
    assert len(tok.encode(TRAIN[0])) < 0.6 * len(TRAIN[0].encode())  # merges compress the training text
    assert tok.token_to_id("Ġthe") is not None  # " the" is frequent enough to be one token


def test_special_tokens_are_matched_whole_and_never_split():
    tok = train_bpe(TRAIN, 400, special_tokens=["<|endoftext|>", "<|pad|>"])
    ids = tok.encode("a<|endoftext|>b<|pad|>")
    assert ids.count(tok.vocab["<|endoftext|>"]) == 1 and ids.count(tok.vocab["<|pad|>"]) == 1
    assert tok.decode(ids, skip_special_tokens=True) == "ab"
    assert tok.encode_batch(["a", "b"]) == [tok.encode("a"), tok.encode("b")]


def test_training_from_files_equals_training_from_texts(tmp_path):
    paths = []
    for i, text in enumerate(TRAIN):
        paths.append(tmp_path / f"{i}.txt")
        paths[-1].write_text(text, encoding="utf-8")
    assert train_bpe(paths, 450).merges == train_bpe(TRAIN, 450).merges
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe not utf-8 \xc3")
    with pytest.raises(TokenizerError, match="cannot read training file .*bad.txt"):
        train_bpe([tmp_path / "bad.txt"], 300)
    with pytest.raises(TokenizerError, match="cannot read training file .*missing.txt"):
        train_bpe([tmp_path / "missing.txt"], 300)


def test_training_is_deterministic():
    assert train_bpe(TRAIN, 450).merges == train_bpe(TRAIN, 450).merges


@pytest.mark.parametrize("texts, size, message", [
    ([], 400, "empty corpus"),
    (["", ""], 400, "empty corpus"),
    (TRAIN, 200, "vocab_size=200 is smaller than the 256 byte symbols"),
])
def test_training_errors(texts, size, message):
    with pytest.raises(TokenizerError, match=message):
        train_bpe(texts, size)


def test_loading_errors(tmp_path):
    with pytest.raises(TokenizerError, match="no such file or directory"):
        load_tokenizer(tmp_path / "missing")
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="tokenizer.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel", "vocab": {}}}))
    with pytest.raises(TokenizerError, match="model type 'WordLevel' is not supported"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "Unigram", "vocab": []}}))
    with pytest.raises(TokenizerError, match="a Unigram model needs at least one piece"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE"}}))
    with pytest.raises(TokenizerError, match="malformed tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        train_bpe(TRAIN, 300).decode([10_000])
