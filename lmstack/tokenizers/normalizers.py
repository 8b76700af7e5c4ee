"""Normalizers of the tokenizer.json pipeline: text -> text before pre-tokenization, as ``tokenizers`` does.

``build_normalizer(spec)`` turns the "normalizer" object of a tokenizer.json into one function. Supported:
Sequence, NFC, NFD, NFKC, NFKD, Lowercase, Strip, Replace, Prepend, BertNormalizer. Anything else raises
TokenizerError naming the component.
"""

import unicodedata
from typing import Callable


from lmstack.errors import TokenizerError
from lmstack.tokenizers.text import (compile_spec_pattern, is_bert_control, is_bert_whitespace, is_cjk,
                                     strip_whitespace)

Normalizer = Callable[[str], str]


def build_normalizer(spec: dict | None) -> Normalizer | None:
    """One function applying the normalizer ``spec`` describes (None: no normalizer)."""
    if spec is None:
        return None
    kind = _kind(spec, "normalizer")
    if kind == "Sequence":
        parts = [build_normalizer(part) for part in spec.get("normalizers") or []]
        parts = [p for p in parts if p is not None]
        return _chain(parts)
    if kind in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda text: unicodedata.normalize(kind, text)
    if kind == "Lowercase":
        return str.lower
    if kind == "Strip":
        left, right = bool(spec.get("strip_left", True)), bool(spec.get("strip_right", True))
        return lambda text: strip_whitespace(text, left, right)
    if kind == "Replace":
        pattern, content = compile_spec_pattern(spec["pattern"]), spec["content"]
        return lambda text: pattern.sub(lambda _: content, text)
    if kind == "Prepend":
        prefix = spec["prepend"]
        return lambda text: prefix + text if text else text
    if kind == "BertNormalizer":
        return bert_normalizer(bool(spec.get("clean_text", True)), bool(spec.get("handle_chinese_chars", True)),
                               spec.get("strip_accents"), bool(spec.get("lowercase", True)))
    raise TokenizerError(f"normalizer {kind!r} is not supported (supported: Sequence, NFC, NFD, NFKC, NFKD, "
                         "Lowercase, Strip, Replace, Prepend, BertNormalizer)")


def bert_normalizer(clean_text: bool, handle_chinese_chars: bool, strip_accents: bool | None,
                    lowercase: bool) -> Normalizer:
    """BERT's: drop control characters, whitespace -> " ", pad CJK ideographs, strip accents, lower-case."""
    strip = lowercase if strip_accents is None else strip_accents

    def normalize(text: str) -> str:
        out = []
        for char in text:
            if clean_text:
                if char in ("\0", "\ufffd") or is_bert_control(char):
                    continue
                if is_bert_whitespace(char):
                    char = " "
            out.append(f" {char} " if handle_chinese_chars and is_cjk(char) else char)
        text = "".join(out)
        if strip:
            text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        return text.lower() if lowercase else text

    return normalize


def _chain(parts: list[Normalizer]) -> Normalizer | None:
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]

    def normalize(text: str) -> str:
        for part in parts:
            text = part(text)
        return text

    return normalize


def _kind(spec: dict, what: str) -> str:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise TokenizerError(f"{what} must be an object with a 'type', got {spec!r:.80}")
    return spec["type"]


__all__ = ["Normalizer", "bert_normalizer", "build_normalizer"]
