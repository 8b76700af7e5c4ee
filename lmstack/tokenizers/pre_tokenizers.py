"""Pre-tokenizers of the tokenizer.json pipeline: split normalised text into the pieces a model tokenizes.

A pre-tokenizer maps a list of pieces to a finer list. A piece is ``(text, start)``, ``start`` being its
offset in the normalised section it came from (Metaspace's ``prepend_scheme="first"`` needs to know which
piece opens the input). Splitting follows ``tokenizers``' ``NormalizedString::split``: the pattern's
matches and the stretches between them are segments; the behaviour (Removed, Isolated, MergedWithPrevious,
MergedWithNext, Contiguous) decides how they become pieces; ``invert`` swaps matches and stretches; empty
pieces are dropped.

Supported: Sequence, Split, Digits, ByteLevel, Metaspace, Whitespace, WhitespaceSplit, Punctuation,
BertPreTokenizer, CharDelimiterSplit. Anything else raises TokenizerError naming it.
"""

import itertools
from dataclasses import dataclass
from typing import Callable

import regex

from lmstack.errors import TokenizerError
from lmstack.tokenizers.pretokenize import GPT2_PATTERN, to_byte_chars
from lmstack.tokenizers.text import WHITESPACE, compile_spec_pattern

Piece = tuple[str, int]
SplitFn = Callable[[list[Piece], bool], list[Piece]]  # (pieces, section opens the input) -> pieces

_WS_CLASS = "[" + "".join(f"\\u{ord(c):04x}" for c in sorted(WHITESPACE)) + "]"
_ONE_WHITESPACE = regex.compile(_WS_CLASS)
_ONE_DIGIT = regex.compile(r"\p{N}")
_DIGIT_RUNS = regex.compile(r"\p{N}+")
_ONE_PUNCTUATION = regex.compile(r"[!-/:-@\[-`{-~\p{P}]")
_WORDS = regex.compile(r"\w+|[^\w" + _WS_CLASS[1:] + "+")  # Whitespace pre-tokenizer: runs of \w or of symbols
_GPT2 = regex.compile(GPT2_PATTERN)
BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")


@dataclass
class PreTokenizer:
    """The whole pre-tokenizer of a tokenizer.json.

    Attributes:
        split: the splitting function (pieces, opens_input) -> pieces.
        byte_level: pieces come out as GPT-2 byte-level characters (a ByteLevel step is in the chain).
    """

    split: SplitFn
    byte_level: bool = False


def build_pre_tokenizer(spec: dict | None) -> PreTokenizer:
    """The PreTokenizer ``spec`` (a tokenizer.json "pre_tokenizer" object) describes; None keeps text whole."""
    if spec is None:
        return PreTokenizer(lambda pieces, _: pieces)
    steps = _flatten(spec)
    functions = [_build_step(step) for step in steps]
    byte_level = any(step["type"] == "ByteLevel" for step in steps)
    return PreTokenizer(functions[0] if len(functions) == 1 else _chain(functions), byte_level)


def _flatten(spec: dict) -> list[dict]:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise TokenizerError(f"pre_tokenizer must be an object with a 'type', got {spec!r:.80}")
    if spec["type"] == "Sequence":
        return [step for part in spec.get("pretokenizers") or [] for step in _flatten(part)]
    return [spec]


def _build_step(spec: dict) -> SplitFn:
    kind = spec["type"]
    if kind == "Split":
        behavior = spec.get("behavior", "Isolated")
        return _splitter(compile_spec_pattern(spec["pattern"]), _behavior(behavior), bool(spec.get("invert", False)))
    if kind == "Digits":
        individual = bool(spec.get("individual_digits", False))
        return _splitter(_ONE_DIGIT if individual else _DIGIT_RUNS, "Isolated" if individual else "Contiguous")
    if kind == "ByteLevel":
        return _byte_level(bool(spec.get("add_prefix_space", True)), bool(spec.get("use_regex", True)))
    if kind == "Metaspace":
        return _metaspace(spec)
    if kind == "Whitespace":
        return _splitter(_WORDS, "Removed", invert=True)
    if kind == "WhitespaceSplit":
        return _splitter(_ONE_WHITESPACE, "Removed")
    if kind == "Punctuation":
        return _splitter(_ONE_PUNCTUATION, _behavior(spec.get("behavior", "Isolated")))
    if kind == "BertPreTokenizer":
        return _chain([_splitter(_ONE_WHITESPACE, "Removed"), _splitter(_ONE_PUNCTUATION, "Isolated")])
    if kind == "CharDelimiterSplit":
        return _splitter(regex.compile(regex.escape(spec["delimiter"])), "Removed")
    raise TokenizerError(f"pre_tokenizer {kind!r} is not supported (supported: Sequence, Split, Digits, ByteLevel, "
                         "Metaspace, Whitespace, WhitespaceSplit, Punctuation, BertPreTokenizer, CharDelimiterSplit)")


def _behavior(name: str) -> str:
    if name not in BEHAVIORS:
        raise TokenizerError(f"Split behavior {name!r} is not one of {list(BEHAVIORS)}")
    return name


def _chain(functions: list[SplitFn]) -> SplitFn:
    def split(pieces: list[Piece], opens_input: bool) -> list[Piece]:
        for function in functions:
            pieces = function(pieces, opens_input)
        return pieces

    return split


def _splitter(pattern: regex.Pattern, behavior: str, invert: bool = False) -> SplitFn:
    def split(pieces: list[Piece], _opens_input: bool) -> list[Piece]:
        out: list[Piece] = []
        for text, start in pieces:
            out.extend(split_text(text, start, pattern, behavior, invert))
        return out

    return split


def split_text(text: str, start: int, pattern: regex.Pattern, behavior: str, invert: bool = False) -> list[Piece]:
    """One piece split as ``tokenizers`` splits a NormalizedString (see the module docstring)."""
    if behavior == "Isolated" and not invert and pattern.groups == 0:
        matches = pattern.findall(text)
        if sum(map(len, matches)) == len(text):  # the usual case: the matches tile the text, no gaps between
            offsets = itertools.accumulate(map(len, matches), initial=start)
            return [(m, o) for m, o in zip(matches, offsets) if m]
    segments = _segments(text, pattern, invert)
    if behavior == "Removed":
        kept = [(s, e) for s, e, is_match in segments if not is_match]
    elif behavior == "Isolated":
        kept = [(s, e) for s, e, _ in segments]
    elif behavior == "MergedWithPrevious":
        kept, previous_match = [], False
        for s, e, is_match in segments:
            if is_match and not previous_match and kept:
                kept[-1] = (kept[-1][0], e)
            else:
                kept.append((s, e))
            previous_match = is_match
    elif behavior == "MergedWithNext":
        kept, previous_match = [], False
        for s, e, is_match in reversed(segments):
            if is_match and not previous_match and kept:
                kept[-1] = (s, kept[-1][1])
            else:
                kept.append((s, e))
            previous_match = is_match
        kept.reverse()
    else:  # Contiguous: runs of matches, and runs of non-matches, each become one piece
        kept, previous_match = [], None
        for s, e, is_match in segments:
            if is_match == previous_match and kept:
                kept[-1] = (kept[-1][0], e)
            else:
                kept.append((s, e))
            previous_match = is_match
    return [(text[s:e], start + s) for s, e in kept if e > s]


def _segments(text: str, pattern: regex.Pattern, invert: bool) -> list[tuple[int, int, bool]]:
    """Matches of ``pattern`` and the stretches between them, in order: (start, end, is_match)."""
    if not text:
        return [(0, 0, False)]
    segments, last = [], 0
    for match in pattern.finditer(text):
        s, e = match.span()
        if s > last:
            segments.append((last, s, invert))
        segments.append((s, e, not invert))
        last = e
    if last < len(text):
        segments.append((last, len(text), invert))
    return segments


def _byte_level(add_prefix_space: bool, use_regex: bool) -> SplitFn:
    def split(pieces: list[Piece], _opens_input: bool) -> list[Piece]:
        out: list[Piece] = []
        for text, start in pieces:
            if add_prefix_space and not text.startswith(" "):
                text = " " + text
            parts = split_text(text, start, _GPT2, "Isolated") if use_regex else [(text, start)]
            out.extend((to_byte_chars(part), offset) for part, offset in parts)
        return out

    return split


def _metaspace(spec: dict) -> SplitFn:
    replacement = spec.get("replacement", "\u2581")
    scheme = spec.get("prepend_scheme")
    if scheme is None:  # files written before prepend_scheme existed
        scheme = "always" if spec.get("add_prefix_space", True) else "never"
    if scheme not in ("always", "first", "never"):
        raise TokenizerError(f"Metaspace prepend_scheme {scheme!r} is not one of always, first, never")
    do_split = bool(spec.get("split", True))
    marker = regex.compile(regex.escape(replacement))

    def split(pieces: list[Piece], opens_input: bool) -> list[Piece]:
        out: list[Piece] = []
        for text, start in pieces:
            text = text.replace(" ", replacement)
            first = opens_input and start == 0
            if (scheme == "always" or (scheme == "first" and first)) and not text.startswith(replacement):
                text = replacement + text
            out.extend(split_text(text, start, marker, "MergedWithNext") if do_split else [(text, start)])
        return out

    return split
