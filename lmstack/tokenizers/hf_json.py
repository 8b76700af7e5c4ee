"""Hugging Face tokenizer files for byte-level BPE: ``tokenizer.json`` (read and write) and GPT-2's
``vocab.json`` + ``merges.txt`` (read).

Supported tokenizer.json pieces, as GPT-2, Llama 3 and Qwen2 use them: normalizer None / NFC / NFD / NFKC
/ NFKD / Lowercase (or a Sequence of them); pre-tokenizer ByteLevel, or Split(regex, Isolated) followed
by ByteLevel(use_regex=false); model BPE (merges as "a b" strings or [a, b] pairs, ignore_merges);
post-processor ByteLevel and TemplateProcessing (single-sequence special tokens); decoder ByteLevel.
Anything else raises TokenizerError naming the field.
"""

from pathlib import Path
from typing import Any

import regex

from lmstack.fileio import read_json_object, write_json
from lmstack.tokenizers.bpe import AddedToken, BPETokenizer, TokenizerError
from lmstack.tokenizers.pretokenize import GPT2_PATTERN


def read_json_file(path: Path) -> dict[str, Any]:
    return read_json_object(path, TokenizerError)


def load_tokenizer_json(path: Path) -> BPETokenizer:
    """Read a byte-level BPE ``tokenizer.json``."""
    data = read_json_file(path)
    try:
        if isinstance(data.get("model"), dict) and data["model"].get("type") == "WordPiece":
            return load_wordpiece_json(data, Path(path))
        return _from_hf(data)
    except (KeyError, TypeError, ValueError) as error:
        if isinstance(error, TokenizerError):
            raise TokenizerError(f"{path}: {error}") from None
        raise TokenizerError(f"{path}: malformed tokenizer.json ({type(error).__name__}: {error})") from None


def _from_hf(data: dict[str, Any]) -> BPETokenizer:
    model = data["model"]
    if model.get("type", "BPE") != "BPE":
        raise TokenizerError(f"model.type {model.get('type')!r} is not supported here (byte-level BPE only)")
    for option in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(option):
            raise TokenizerError(f"model.{option} is not supported for byte-level BPE")
    if model.get("dropout"):
        raise TokenizerError("model.dropout (BPE dropout) is not supported")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    if any(len(m) != 2 for m in merges):
        raise TokenizerError("model.merges must hold pairs")
    pattern, add_prefix_space = _read_pre_tokenizer(data.get("pre_tokenizer"))
    prefix, suffix = _read_post_processor(data.get("post_processor"), data)
    _check_decoder(data.get("decoder"))
    added = [AddedToken(t["content"], int(t["id"]), bool(t.get("special", False))) for t in data.get("added_tokens") or []]
    return BPETokenizer(vocab={str(k): int(v) for k, v in model["vocab"].items()}, merges=merges, pattern=pattern,
                        added_tokens=added, normalizers=_read_normalizers(data.get("normalizer")),
                        add_prefix_space=add_prefix_space, ignore_merges=bool(model.get("ignore_merges", False)),
                        prefix_tokens=prefix, suffix_tokens=suffix, hf_json=data)


def _read_normalizers(spec: dict | None) -> tuple[str, ...]:
    if spec is None:
        return ()
    if spec["type"] == "Sequence":
        return tuple(name for part in spec["normalizers"] for name in _read_normalizers(part))
    return (spec["type"],)


def _read_pre_tokenizer(spec: dict | None) -> tuple[str, bool]:
    """(splitting regex, add_prefix_space) from ByteLevel or Sequence[Split, ByteLevel]."""
    if spec is None:
        raise TokenizerError("pre_tokenizer is missing; byte-level BPE needs a ByteLevel pre-tokenizer")
    if spec["type"] == "ByteLevel":
        if not spec.get("use_regex", True):
            raise TokenizerError("a ByteLevel pre_tokenizer with use_regex=false needs a Split before it")
        return GPT2_PATTERN, bool(spec.get("add_prefix_space", False))
    if spec["type"] == "Sequence":
        parts = spec["pretokenizers"]
        if len(parts) == 2 and parts[0]["type"] == "Split" and parts[1]["type"] == "ByteLevel":
            split = parts[0]
            if split.get("behavior", "Isolated") != "Isolated" or split.get("invert", False):
                raise TokenizerError("pre_tokenizer Split must use behavior Isolated without invert")
            pattern = split["pattern"].get("Regex") or _literal(split["pattern"]["String"])
            return pattern, bool(parts[1].get("add_prefix_space", False))
    raise TokenizerError(f"pre_tokenizer {spec['type']!r} is not supported here")


def _literal(text: str) -> str:
    return regex.escape(text)


def _read_post_processor(spec: dict | None, data: dict) -> tuple[list[int], list[int]]:
    """Special-token ids a single sequence gets before and after it."""
    if spec is None or spec["type"] in ("ByteLevel",):
        return [], []
    if spec["type"] == "Sequence":
        found = [_read_post_processor(p, data) for p in spec["processors"]]
        return [i for f in found for i in f[0]], [i for f in found for i in f[1]]
    if spec["type"] != "TemplateProcessing":
        raise TokenizerError(f"post_processor {spec['type']!r} is not supported here")
    ids = {name: token["ids"] for name, token in spec.get("special_tokens", {}).items()}
    prefix, suffix, seen_sequence = [], [], False
    for item in spec["single"]:
        if "Sequence" in item:
            seen_sequence = True
        elif "SpecialToken" in item:
            (prefix if not seen_sequence else suffix).extend(ids[item["SpecialToken"]["id"]])
    return prefix, suffix


def _check_decoder(spec: dict | None) -> None:
    if spec is not None and spec["type"] != "ByteLevel":
        raise TokenizerError(f"decoder {spec['type']!r} is not supported here (ByteLevel only)")


def save_tokenizer_json(tokenizer: BPETokenizer, directory) -> Path:
    """Write ``directory/tokenizer.json`` in the format the ``tokenizers`` library reads."""
    data = dict(tokenizer.hf_json) if tokenizer.hf_json is not None else _fresh_json(tokenizer)
    model = dict(data.get("model", {}))
    model.update(type="BPE", vocab=tokenizer.vocab, merges=[list(m) for m in tokenizer.merges],
                 ignore_merges=tokenizer.ignore_merges)
    data["model"] = model
    data["added_tokens"] = [{"id": t.id, "content": t.content, "single_word": False, "lstrip": False,
                             "rstrip": False, "normalized": False, "special": t.special} for t in tokenizer.added_tokens]
    path = Path(directory) / "tokenizer.json"
    write_json(path, data)
    return path


def _fresh_json(tokenizer: BPETokenizer) -> dict[str, Any]:
    if tokenizer.pattern == GPT2_PATTERN:
        pre = {"type": "ByteLevel", "add_prefix_space": tokenizer.add_prefix_space, "trim_offsets": True,
               "use_regex": True}
    else:
        pre = {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": tokenizer.pattern}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": tokenizer.add_prefix_space, "trim_offsets": False,
             "use_regex": False}]}
    normalizer = None
    if tokenizer.normalizers:
        parts = [{"type": n} for n in tokenizer.normalizers]
        normalizer = parts[0] if len(parts) == 1 else {"type": "Sequence", "normalizers": parts}
    return {"version": "1.0", "truncation": None, "padding": None, "normalizer": normalizer, "pre_tokenizer": pre,
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False}}


def load_vocab_merges(vocab_path: Path, merges_path: Path) -> BPETokenizer:
    """GPT-2's original files: vocab.json (token -> id) and merges.txt ("#version" header, "a b" lines)."""
    vocab = read_json_file(vocab_path)
    try:
        lines = Path(merges_path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise TokenizerError(f"{merges_path}: cannot read ({error})") from None
    merges = []
    for number, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#version"):
            continue
        pair = tuple(line.split(" "))
        if len(pair) != 2:
            raise TokenizerError(f"{merges_path}:{number}: expected two symbols separated by one space")
        merges.append(pair)
    added = [AddedToken(t, i) for t, i in vocab.items() if t.startswith("<|") and t.endswith("|>")]
    return BPETokenizer(vocab={str(k): int(v) for k, v in vocab.items()}, merges=merges, added_tokens=added)


# --- WordPiece (BERT) ---------------------------------------------------------------------------------------

def load_wordpiece_json(data: dict[str, Any], path: Path):
    """A BERT tokenizer.json: BertNormalizer + BertPreTokenizer + WordPiece (+ CLS/SEP template)."""
    from lmstack.tokenizers.wordpiece import WordPieceTokenizer

    model = data["model"]
    normalizer = data.get("normalizer") or {}
    if normalizer and normalizer.get("type") != "BertNormalizer":
        raise TokenizerError(f"{path}: WordPiece with normalizer {normalizer.get('type')!r} is not supported")
    if (data.get("pre_tokenizer") or {}).get("type", "BertPreTokenizer") != "BertPreTokenizer":
        raise TokenizerError(f"{path}: WordPiece needs the BertPreTokenizer")
    return WordPieceTokenizer(
        vocab={str(k): int(v) for k, v in model["vocab"].items()}, lowercase=normalizer.get("lowercase", True),
        strip_accents=normalizer.get("strip_accents"), handle_chinese_chars=normalizer.get("handle_chinese_chars", True),
        clean_text=normalizer.get("clean_text", True), unk_token=model.get("unk_token") or "[UNK]",
        max_input_chars_per_word=int(model.get("max_input_chars_per_word", 100)),
        continuing_subword_prefix=model.get("continuing_subword_prefix") or "##")


def load_vocab_txt(path: Path):
    """BERT's vocab.txt (one token per line, id = line number), with options from tokenizer_config.json."""
    from lmstack.tokenizers.wordpiece import WordPieceTokenizer

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
    return WordPieceTokenizer(vocab=vocab, lowercase=config.get("do_lower_case", True),
                              strip_accents=config.get("strip_accents"),
                              handle_chinese_chars=config.get("tokenize_chinese_chars", True),
                              **{k: config[k] for k in ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token")
                                 if isinstance(config.get(k), str)})


def save_wordpiece_json(tokenizer, directory) -> Path:
    """Write vocab.txt and a tokenizer.json the tokenizers library reads as the same BERT tokenizer."""
    from lmstack.fileio import atomic_path

    directory = Path(directory)
    ordered = [t for t, _ in sorted(tokenizer.vocab.items(), key=lambda item: item[1])]
    with atomic_path(directory / "vocab.txt") as tmp:
        tmp.write_text("\n".join(ordered) + "\n", encoding="utf-8")
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
    data = {"version": "1.0", "truncation": None, "padding": None,
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
    path = directory / "tokenizer.json"
    write_json(path, data)
    return path
