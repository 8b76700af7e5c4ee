"""Character classes and patterns shared by the tokenizer components, defined as ``tokenizers`` (Rust) does.

Rust's ``char::is_whitespace`` is the Unicode White_Space property, which differs from Python's
``str.isspace`` (that also counts U+001C..U+001F): the sets are spelled out so both sides agree.
"""

import unicodedata

import regex

from lmstack.errors import TokenizerError

# Unicode White_Space (Rust char::is_whitespace).
WHITESPACE = frozenset("\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009"
                       "\u200a\u2028\u2029\u202f\u205f\u3000")
_CJK_RANGES = ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF), (0x2A700, 0x2B73F), (0x2B740, 0x2B81F),
               (0x2B820, 0x2CEAF), (0xF900, 0xFAFF), (0x2F800, 0x2FA1F))


def strip_whitespace(text: str, left: bool = True, right: bool = True) -> str:
    start, end = 0, len(text)
    while left and start < end and text[start] in WHITESPACE:
        start += 1
    while right and end > start and text[end - 1] in WHITESPACE:
        end -= 1
    return text[start:end]


def is_bert_control(char: str) -> bool:
    return char not in "\t\n\r" and unicodedata.category(char).startswith("C")


def is_bert_whitespace(char: str) -> bool:
    return char in " \t\n\r" or unicodedata.category(char) == "Zs" or char.isspace()


def is_bert_punctuation(char: str) -> bool:
    code = ord(char)
    if 33 <= code <= 47 or 58 <= code <= 64 or 91 <= code <= 96 or 123 <= code <= 126:
        return True  # ASCII symbols count as punctuation for BERT, e.g. "$" and "^"
    return unicodedata.category(char).startswith("P")


def is_cjk(char: str) -> bool:
    code = ord(char)
    return any(lo <= code <= hi for lo, hi in _CJK_RANGES)


def is_word_char(char: str) -> bool:
    """Rust's alphanumeric-or-underscore, which decides an added token's ``single_word`` boundary."""
    return char.isalnum() or char == "_"


def compile_spec_pattern(spec) -> regex.Pattern:
    """A tokenizer.json pattern ({"String": literal} or {"Regex": pattern}) compiled once.

    Raises:
        TokenizerError: neither form, or a regex that does not compile.
    """
    if isinstance(spec, str):
        return regex.compile(regex.escape(spec))
    if isinstance(spec, dict) and isinstance(spec.get("String"), str):
        return regex.compile(regex.escape(spec["String"]))
    if isinstance(spec, dict) and isinstance(spec.get("Regex"), str):
        try:
            return regex.compile(spec["Regex"])
        except regex.error as error:
            raise TokenizerError(f"pattern {spec['Regex']!r} is not a valid regex ({error})") from None
    raise TokenizerError(f"pattern must be {{'String': ...}} or {{'Regex': ...}}, got {spec!r:.80}")
