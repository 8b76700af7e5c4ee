"""WordPiece behaviour on a hand-made vocabulary: greedy longest match, [UNK] words, errors."""

import pytest

from lmstack.tokenizers import TokenizerError, WordPieceTokenizer

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##aff", "##able", "aff", "##a", "able", ",", "!",
         "hello", "##s"]


@pytest.fixture
def tok():
    return WordPieceTokenizer(vocab={t: i for i, t in enumerate(VOCAB)})


def test_greedy_longest_match_first(tok):
    assert tok.encode("unaffable", add_special_tokens=False) == [5, 6, 7]  # un ##aff ##able
    assert tok.encode("Hellos!") == [2, 13, 14, 12, 3]  # lower-cased, [CLS] ... [SEP]


def test_uncoverable_and_overlong_words_become_unk(tok):
    assert tok.encode("hellox", add_special_tokens=False) == [1]
    long_tok = WordPieceTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, max_input_chars_per_word=4)
    assert long_tok.encode("hello able", add_special_tokens=False) == [1, 10]


def test_offsets_point_into_the_original_text(tok):
    out = tok("  Ünaffable, HELLO")
    assert out["offset_mapping"] == [(0, 0), (2, 4), (4, 7), (7, 11), (11, 12), (13, 18), (0, 0)]


def test_errors(tok):
    with pytest.raises(TokenizerError, match="unk_token '\\[UNK\\]' is not in the vocabulary"):
        WordPieceTokenizer(vocab={"a": 0})
    with pytest.raises(TokenizerError, match="truncation needs max_length"):
        tok("hello", truncation=True)
    with pytest.raises(TokenizerError, match="too small to hold the special tokens"):
        tok("hello", truncation=True, max_length=1)
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([99])
    with pytest.raises(TokenizerError, match="unknown truncation strategy"):
        tok("hello able", "hello", truncation="sideways", max_length=4)


@pytest.mark.parametrize("options", [{}, {"lowercase": False}, {"clean_text": False}])
def test_the_fast_ids_path_equals_the_character_path(options):
    import random
    import string

    tok = WordPieceTokenizer(vocab={t: i for i, t in enumerate(VOCAB)}, **options)
    rng = random.Random(0)
    alphabet = string.printable + "\x00\x01\x0b\x0c\x1c\x1f\x7f" + "unaffable hello"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 80))) for _ in range(300)]
    texts += ["Hellos, unaffable!", "tab\tsep\nline\r\n", "", "   ", "Ünaffable 東京 hello"]  # the last: not ASCII
    for text in texts:
        assert tok.ids(text) == [i for i, _ in tok.tokenize_with_offsets(text)], repr(text)
        assert tok.ids(text) == [i for i, _ in tok.tokenize_with_offsets(text)]  # again: from the word cache
