"""Hugging Face tokenizer files, read and written here and nowhere else: ``tokenizer.json`` (any pipeline of
the components in normalizers / pre_tokenizers / bpe_model / unigram / wordpiece / post_processors /
decoders), GPT-2's ``vocab.json`` + ``merges.txt`` and BERT's ``vocab.txt``.

A tokenizer.json whose pipeline is exactly BERT's (BertNormalizer, BertPreTokenizer, WordPiece) loads as a
WordPieceTokenizer, which also gives pairs, truncation and character offsets; everything else loads as a
``Tokenizer`` pipeline. Unsupported components and malformed files raise TokenizerError naming the file
and the component.
"""

from pathlib import Path
from typing import Any

from lmstack.errors import TokenizerError
from lmstack.fileio import read_json_object
from lmstack.tokenizers.bpe_model import BPE
from lmstack.tokenizers.decoders import build_decoder
from lmstack.tokenizers.normalizers import build_normalizer
from lmstack.tokenizers.pipeline import AddedToken, Tokenizer
from lmstack.tokenizers.post_processors import build_post_processor
from lmstack.tokenizers.pre_tokenizers import build_pre_tokenizer
from lmstack.tokenizers.pretokenize import GPT2_PATTERN
from lmstack.tokenizers.unigram import Unigram
from lmstack.tokenizers.wordpiece import WordPiece, WordPieceTokenizer


def read_json_file(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError)


def load_tokenizer_json(path: Path) -> Tokenizer | WordPieceTokenizer:
    """Read a ``tokenizer.json``."""
    return tokenizer_from_json(read_json_file(path), source=str(path))


def tokenizer_from_json(data: dict[str, Any], source: str = "tokenizer.json") -> Tokenizer | WordPieceTokenizer:
    """The tokenizer a tokenizer.json object describes; errors name ``source``."""
    try:
        if _is_bert(data):
            return _wordpiece_tokenizer(data)
        return _pipeline(data)
    except TokenizerError as error:
        raise TokenizerError(f"{source}: {error}") from None
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as error:
        raise TokenizerError(f"{source}: malformed tokenizer.json ({type(error).__name__}: {error})") from None


def _pipeline(data: dict[str, Any]) -> Tokenizer:
    model = _model(data.get("model"))
    added = _added_tokens(data.get("added_tokens") or [])
    _check_ids(model.vocab, added)
    return Tokenizer(model, normalizer=build_normalizer(data.get("normalizer")),
                     pre_tokenizer=build_pre_tokenizer(data.get("pre_tokenizer")),
                     post_processor=build_post_processor(data.get("post_processor")),
                     decoder=build_decoder(data.get("decoder")), added_tokens=added, hf_json=data)


def _model(spec: dict | None):
    if not isinstance(spec, dict):
        raise TokenizerError("model must be an object")
    kind = spec.get("type")
    if kind is None:  # older files leave the type out; the fields tell
        kind = "BPE" if "merges" in spec else "Unigram" if isinstance(spec.get("vocab"), list) else "WordPiece"
    if kind == "BPE":
        if spec.get("dropout"):
            raise TokenizerError("model.dropout (BPE dropout) is not supported")
        merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in spec.get("merges") or []]
        if any(len(m) != 2 for m in merges):
            raise TokenizerError("model.merges must hold pairs")
        return BPE(_vocab(spec["vocab"]), merges, unk_token=spec.get("unk_token"),
                   continuing_subword_prefix=spec.get("continuing_subword_prefix"),
                   end_of_word_suffix=spec.get("end_of_word_suffix"), fuse_unk=bool(spec.get("fuse_unk", False)),
                   byte_fallback=bool(spec.get("byte_fallback", False)),
                   ignore_merges=bool(spec.get("ignore_merges", False)))
    if kind == "Unigram":
        pieces = [(str(piece), float(score)) for piece, score in spec["vocab"]]
        unk = spec.get("unk_id")
        return Unigram(pieces, None if unk is None else int(unk), bool(spec.get("byte_fallback", False)))
    if kind == "WordPiece":
        return WordPiece(_vocab(spec["vocab"]), spec.get("unk_token") or "[UNK]",
                         spec.get("continuing_subword_prefix") or "##",
                         int(spec.get("max_input_chars_per_word", 100)))
    raise TokenizerError(f"model type {kind!r} is not supported (supported: BPE, Unigram, WordPiece)")


def _vocab(vocab: dict) -> dict[str, int]:
    """token -> id, checked: ids are unique non-negative integers."""
    if not isinstance(vocab, dict):
        raise TokenizerError("model.vocab must be an object of token -> id")
    out, seen = {}, {}
    for token, i in vocab.items():
        if not isinstance(i, int) or isinstance(i, bool) or i < 0:
            raise TokenizerError(f"model.vocab: token {token!r} has id {i!r}; ids must be non-negative integers")
        if i in seen:
            raise TokenizerError(f"model.vocab: tokens {seen[i]!r} and {token!r} share id {i}")
        seen[i] = token
        out[str(token)] = i
    return out


def _check_ids(vocab: dict[str, int], added: list[AddedToken]) -> None:
    """Every id names one token, and ids run over [0, number of tokens): a stray huge id would make every
    embedding table sized from the tokenizer absurd."""
    tokens = dict(zip(vocab.values(), vocab))
    for token in added:
        if token.id < 0:
            raise TokenizerError(f"added token {token.content!r} has negative id {token.id}")
        if tokens.get(token.id, token.content) != token.content:
            raise TokenizerError(f"added token {token.content!r} has id {token.id}, which the vocabulary gives "
                                 f"to {tokens[token.id]!r}")
        tokens.setdefault(token.id, token.content)
    if tokens and max(tokens) >= len(tokens):
        raise TokenizerError(f"token id {max(tokens)} is out of range: the file holds {len(tokens)} tokens, so ids "
                             f"must lie in [0, {len(tokens)})")


def _added_tokens(items: list[dict]) -> list[AddedToken]:
    tokens = []
    for item in items:
        special = bool(item.get("special", False))
        tokens.append(AddedToken(str(item["content"]), int(item["id"]), special, bool(item.get("lstrip", False)),
                                 bool(item.get("rstrip", False)), bool(item.get("single_word", False)),
                                 bool(item.get("normalized", not special))))
    return tokens


# --- writing a fresh tokenizer.json -----------------------------------------------------------------------

def byte_level_bpe_json(vocab: dict[str, int], merges: list[tuple[str, str]], pattern: str,
                        special_tokens: list[str]) -> dict[str, Any]:
    """The tokenizer.json of a byte-level BPE tokenizer: GPT-2's ByteLevel pre-tokenizer, or a Split on
    ``pattern`` followed by ByteLevel without its own regex (Llama 3 / Qwen2 style)."""
    if pattern == GPT2_PATTERN:
        pre = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}
    added = [{"id": vocab[t], "content": t, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False, "special": True} for t in special_tokens]
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": pre, "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
            "model": bpe_model_json(vocab, merges)}


def bpe_model_json(vocab: dict[str, int], merges: list, *, unk_token: str | None = None, fuse_unk: bool = False,
                   byte_fallback: bool = False, ignore_merges: bool = False) -> dict[str, Any]:
    """The "model" object of a BPE tokenizer.json (merges as [left, right] pairs)."""
    return {"type": "BPE", "dropout": None, "unk_token": unk_token, "continuing_subword_prefix": None,
            "end_of_word_suffix": None, "fuse_unk": fuse_unk, "byte_fallback": byte_fallback,
            "ignore_merges": ignore_merges, "vocab": vocab, "merges": [list(m) for m in merges]}


def load_vocab_merges(vocab_path: Path, merges_path: Path) -> Tokenizer:
    """GPT-2's original files: vocab.json (token -> id) and merges.txt ("#version" header, "a b" lines)."""
    vocab = _vocab(read_json_file(vocab_path))
    try:
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{merges_path}: cannot read ({error})") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2:
            raise TokenizerError(f"{merges_path}:{number}: expected two symbols separated by one space")
        merges.append(pair)
    specials = [t for t in vocab if t.startswith("<|") and t.endswith("|>")]
    return tokenizer_from_json(byte_level_bpe_json(vocab, merges, GPT2_PATTERN, specials), source=str(merges_path))


# --- WordPiece (BERT) ---------------------------------------------------------------------------------------

def _is_bert(data: dict[str, Any]) -> bool:
    model, normalizer = data.get("model") or {}, data.get("normalizer") or {"type": "BertNormalizer"}
    pre = data.get("pre_tokenizer") or {"type": "BertPreTokenizer"}
    return (isinstance(model, dict) and model.get("type") == "WordPiece" and normalizer.get("type") == "BertNormalizer"
            and pre.get("type") == "BertPreTokenizer")


def _wordpiece_tokenizer(data: dict[str, Any]) -> WordPieceTokenizer:
    """A BERT tokenizer.json: BertNormalizer + BertPreTokenizer + WordPiece (+ CLS/SEP template)."""
    model, normalizer = data["model"], data.get("normalizer") or {}
    tokenizer = WordPieceTokenizer(
        vocab=_vocab(model["vocab"]), lowercase=normalizer.get("lowercase", True),
        strip_accents=normalizer.get("strip_accents"), handle_chinese_chars=normalizer.get("handle_chinese_chars", True),
        clean_text=normalizer.get("clean_text", True), unk_token=model.get("unk_token") or "[UNK]",
        max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
        continuing_subword_prefix=model.get("continuing_subword_prefix") or "##")
    # Saved afresh rather than as read: padding / truncation settings of the file are per call here.
    tokenizer.hf_json = wordpiece_json(tokenizer)
    return tokenizer


def load_vocab_txt(path: Path) -> WordPieceTokenizer:
    """BERT's vocab.txt (one token per line, id = line number), with options from tokenizer_config.json."""
    try:
        tokens = Path(path).read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as error:
        raise TokenizerError(f"{path}: cannot read ({error})") from None
    if tokens and tokens[-1] == "":
        tokens.pop()
    vocab: dict[str, int] = {}
    for i, token in enumerate(tokens):
        vocab.setdefault(token, i)
    config_path = Path(path).with_name("tokenizer_config.json")
    config = read_json_file(config_path) if config_path.is_file() else {}
    tokenizer = WordPieceTokenizer(
        vocab=vocab, lowercase=config.get("do_lower_case", True), strip_accents=config.get("strip_accents"),
        handle_chinese_chars=config.get("tokenize_chinese_chars", True),
        **{k: config[k] for k in ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token")
           if isinstance(config.get(k), str)})
    tokenizer.hf_json = wordpiece_json(tokenizer)
    return tokenizer


def wordpiece_json(tokenizer: WordPieceTokenizer) -> dict[str, Any]:
    """The tokenizer.json the tokenizers library reads as the same BERT tokenizer."""
    specials = [t for t in (tokenizer.pad_token, tokenizer.unk_token, tokenizer.cls_token, tokenizer.sep_token,
                            tokenizer.mask_token) if t in tokenizer.vocab]
    cls_, sep = tokenizer.cls_token, tokenizer.sep_token
    template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": cls_, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                   {"SpecialToken": {"id": sep, "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": cls_, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": sep, "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}},
                 {"SpecialToken": {"id": sep, "type_id": 1}}],
        "special_tokens": {t: {"id": t, "ids": [tokenizer.vocab[t]], "tokens": [t]} for t in (cls_, sep)}}
    return {"version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": tokenizer.vocab[t], "content": t, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True} for t in specials],
            "normalizer": {"type": "BertNormalizer", "clean_text": tokenizer.clean_text,
                           "handle_chinese_chars": tokenizer.handle_chinese_chars,
                           "strip_accents": tokenizer.strip_accents, "lowercase": tokenizer.lowercase},
            "pre_tokenizer": {"type": "BertPreTokenizer"}, "post_processor": template,
            "decoder": {"type": "WordPiece", "prefix": tokenizer.continuing_subword_prefix, "cleanup": True},
            "model": {"type": "WordPiece", "unk_token": tokenizer.unk_token,
                      "continuing_subword_prefix": tokenizer.continuing_subword_prefix,
                      "max_input_chars_per_word": tokenizer.max_input_chars_per_word, "vocab": tokenizer.vocab}}
