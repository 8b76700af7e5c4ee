"""Each tokenizer.json component alone (every Split behaviour, added-token options, normalizers, BPE
options) against the `tokenizers` library, on one small trained model with the component swapped in."""

import json

import pytest

from lmstack.errors import TokenizerError
from lmstack.tokenizers import tokenizer_from_json
from tests.tokenizers.corpus import HELD_OUT, TRAIN

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

TEXTS = HELD_OUT + ["a-b--c, d;e  f", "x1y22z333 4444", "<b>bold</b> and <i>it</i>", " <sep>x<sep> y <sep>",
                    "word<sep>word", "  spaced  <sep>  out  ", "ÉCOLE élève", ""]


@pytest.fixture(scope="module")
def base():
    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(TRAIN * 4, trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]"],
                                                           show_progress=False))
    return tok


def _same(ref) -> None:
    ours = tokenizer_from_json(json.loads(ref.to_str()))
    for text in TEXTS:
        assert ours.encode(text) == ref.encode(text).ids, text
        ids = ref.encode(text).ids
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text


def _with(base, **parts):
    tok = tokenizers.Tokenizer.from_str(base.to_str())
    for name, value in parts.items():
        setattr(tok, name, value)
    return tok


@pytest.mark.parametrize("invert", [False, True])
@pytest.mark.parametrize("behavior", ["removed", "isolated", "merged_with_previous", "merged_with_next",
                                      "contiguous"])
@pytest.mark.parametrize("pattern", ["-", Regex(r"[,;\s]+"), Regex(r"\d")], ids=["string", "regex", "digit"])
def test_split_behaviors(base, pattern, behavior, invert):
    _same(_with(base, pre_tokenizer=pre_tokenizers.Split(pattern, behavior=behavior, invert=invert)))


@pytest.mark.parametrize("pre", [
    pre_tokenizers.Digits(individual_digits=False), pre_tokenizers.Digits(individual_digits=True),
    pre_tokenizers.WhitespaceSplit(), pre_tokenizers.BertPreTokenizer(), pre_tokenizers.CharDelimiterSplit("-"),
    pre_tokenizers.Punctuation(behavior="removed"), pre_tokenizers.Punctuation(behavior="merged_with_next"),
    pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]),
    pre_tokenizers.Metaspace(prepend_scheme="never"), pre_tokenizers.Metaspace(prepend_scheme="first", split=True),
], ids=lambda p: str(p)[:60])
def test_pre_tokenizers(base, pre):
    metaspace = "Metaspace" in str(pre)
    _same(_with(base, pre_tokenizer=pre, decoder=decoders.Metaspace(prepend_scheme="never") if metaspace else None))


@pytest.mark.parametrize("norm", [
    normalizers.Strip(), normalizers.Strip(left=False, right=True), normalizers.Lowercase(), normalizers.NFKD(),
    normalizers.Replace(Regex(r"\s+"), " "), normalizers.Replace("é", "e"), normalizers.Prepend("_"),
    normalizers.BertNormalizer(strip_accents=True, lowercase=False),
    normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.Strip()]),
], ids=lambda n: n.__class__.__name__)
def test_normalizers(base, norm):
    _same(_with(base, normalizer=norm))


@pytest.mark.parametrize("options", [dict(), dict(lstrip=True), dict(rstrip=True), dict(lstrip=True, rstrip=True),
                                     dict(single_word=True), dict(normalized=True), dict(normalized=False)],
                         ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("special", [True, False])
def test_added_token_options(base, options, special):
    ref = _with(base, normalizer=normalizers.Lowercase())
    token = AddedToken("<sep>", **options)
    (ref.add_special_tokens if special else ref.add_tokens)([token, AddedToken("<B>", normalized=True)])
    _same(ref)
    ours = tokenizer_from_json(json.loads(ref.to_str()))
    ids = ref.encode("x <sep> y").ids
    assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("options", [dict(continuing_subword_prefix="##"), dict(end_of_word_suffix="</w>"),
                                     dict(fuse_unk=True), dict(byte_fallback=True)], ids=lambda o: next(iter(o)))
def test_bpe_model_options(options):
    tok = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]", **options))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer_options = {k: v for k, v in options.items() if k in ("continuing_subword_prefix", "end_of_word_suffix")}
    tok.train_from_iterator(TRAIN * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "<0x41>"],
                                                           limit_alphabet=40, show_progress=False,
                                                           **trainer_options))
    if "end_of_word_suffix" in options:
        tok.decoder = decoders.BPEDecoder(suffix="</w>")
    _same(tok)


def test_unigram_segmentation_matches_the_documented_example():
    """The example of tokenizers' Unigram docs: best-scoring pieces, unknown characters fused."""
    pieces = [["<unk>", 0.0], ["a", 0.0], ["b", 0.0], ["c", 0.0], ["d", 0.0], ["cd", 1.0], ["ab", 2.0],
              ["abc", 5.0], ["abcd", 10.0]]
    data = {"model": {"type": "Unigram", "unk_id": 0, "vocab": pieces}, "pre_tokenizer": None}
    ours = tokenizer_from_json(data)
    ref = tokenizers.Tokenizer.from_str(json.dumps(data))
    assert [ours.id_to_token[i] for i in ours.encode("abcdacdxx")] == ["abcd", "a", "cd", "<unk>"]
    assert ours.encode("abcdacdxx") == ref.encode("abcdacdxx").ids


@pytest.mark.parametrize("spec, component", [
    ({"normalizer": {"type": "Precompiled", "precompiled_charsmap": ""}}, "normalizer 'Precompiled'"),
    ({"pre_tokenizer": {"type": "UnicodeScripts"}}, "pre_tokenizer 'UnicodeScripts'"),
    ({"decoder": {"type": "CTC"}}, "decoder 'CTC'"),
    ({"post_processor": {"type": "Magic"}}, "post_processor 'Magic'"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"Regex": "("}, "behavior": "Isolated"}}, "not a valid regex"),
    ({"pre_tokenizer": {"type": "Split", "pattern": {"String": "x"}, "behavior": "Sideways"}}, "Sideways"),
])
def test_unsupported_components_are_named(base, spec, component):
    data = {**json.loads(base.to_str()), **spec}
    with pytest.raises(TokenizerError, match=component):
        tokenizer_from_json(data)
