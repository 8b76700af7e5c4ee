"""The priority-queue BPE merge equals the quadratic reference loop, on real merges and adversarial runs."""

import random

from lmstack.tokenizers import train_bpe
from lmstack.tokenizers.bpe_model import merge_by_rescanning
from lmstack.tokenizers.native_bpe import native_merger
from lmstack.tokenizers.pretokenize import to_byte_chars
from tests.tokenizers.corpus import HELD_OUT, TRAIN


def test_heap_merge_equals_rescanning_on_words_and_long_runs():
    model = train_bpe(TRAIN * 3, 600).model
    rng = random.Random(0)
    words = [to_byte_chars(w) for text in HELD_OUT + TRAIN for w in text.split()]
    alphabet = "aeinst the"
    words += ["".join(rng.choice(alphabet) for _ in range(rng.randint(50, 400))) for _ in range(20)]
    words += ["a" * 257, "ab" * 300, " " * 100]
    native = native_merger(model.table)
    for word in words:
        initial = model.initial_symbols(word)
        want = merge_by_rescanning(model.table, initial)
        assert model.merge(initial) == want, word[:40]
        if native is not None:
            assert native.merge(initial) == want, word[:40]


def test_unknown_characters_are_dropped_without_unk_token():
    """As tokenizers does when a BPE model has neither unk_token nor byte_fallback."""
    model = train_bpe(TRAIN, 300).model
    model.vocab = {k: v for k, v in model.vocab.items() if k != "a"}
    assert model.initial_symbols("bab") == [model.vocab["b"], model.vocab["b"]]


def test_the_compiled_merge_is_built_and_used_for_long_pieces():
    model = train_bpe(TRAIN * 3, 600).model
    piece = to_byte_chars(" ".join(TRAIN))  # one long piece, as a tokenizer without pre-tokenizer sees it
    assert model.tokenize(piece) == merge_by_rescanning(model.table, model.initial_symbols(piece))
    assert model._native, "the compiled merge should be available on this machine (a C++ compiler is)"


def test_compiled_encode_equals_python_with_byte_fallback_and_unknowns():
    """Whole pieces in C++ (initial symbols + merges) against the Python path, on a vocabulary missing
    characters: byte fallback where all bytes exist, else the (fused) unknown token."""
    from lmstack.tokenizers.bpe_model import BPE

    base = train_bpe(TRAIN * 3, 600).model
    vocab = {token: i for token, i in base.vocab.items() if len(token) > 1 or token.isascii()}
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(0xC0, 0x100)})
    vocab["<unk>"] = len(vocab) + 300
    merges = [(a, b) for a, b in base.merges if a in vocab and b in vocab and a + b in vocab]
    text = "".join(TRAIN) * 2 + " é ü 中文 🙂"
    for byte_fallback in (True, False):
        for fuse in (True, False):
            python = BPE(vocab, merges, unk_token="<unk>", byte_fallback=byte_fallback, fuse_unk=fuse, native=False)
            compiled = BPE(vocab, merges, unk_token="<unk>", byte_fallback=byte_fallback, fuse_unk=fuse)
            assert compiled.tokenize(text) == python.tokenize(text)
            assert compiled._native_encodes
