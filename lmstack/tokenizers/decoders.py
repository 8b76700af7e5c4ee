"""Decoders of the tokenizer.json pipeline: token strings -> text, as ``tokenizers`` chains them.

Every decoder maps a list of token strings to a new list (``decode_chain``); the text is their
concatenation. Without a decoder, tokens are joined by spaces. Supported: Sequence, ByteLevel, Metaspace,
ByteFallback, Fuse, Strip, Replace, WordPiece, BPEDecoder. Anything else raises TokenizerError naming it.
"""

from typing import Callable

from lmstack.errors import TokenizerError
from lmstack.tokenizers.pretokenize import unicode_to_bytes
from lmstack.tokenizers.text import compile_spec_pattern

Decoder = Callable[[list[str]], list[str]]


def build_decoder(spec: dict | None) -> Callable[[list[str]], str]:
    """tokens -> text for the decoder ``spec`` describes."""
    if spec is None:
        return " ".join
    chain = _build(spec)
    return lambda tokens: "".join(chain(tokens))


def _build(spec: dict) -> Decoder:
    if not isinstance(spec, dict) or not isinstance(spec.get("type"), str):
        raise TokenizerError(f"decoder must be an object with a 'type', got {spec!r:.80}")
    kind = spec["type"]
    if kind == "Sequence":
        parts = [_build(part) for part in spec.get("decoders") or []]
        return lambda tokens: _run_all(parts, tokens)
    if kind == "ByteLevel":
        return _byte_level
    if kind == "Metaspace":
        return _metaspace(spec.get("replacement", "\u2581"), spec.get("prepend_scheme") or
                          ("always" if spec.get("add_prefix_space", True) else "never"))
    if kind == "ByteFallback":
        return _byte_fallback
    if kind == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if kind == "Strip":
        return _strip(spec["content"], int(spec.get("start", 0)), int(spec.get("stop", 0)))
    if kind == "Replace":
        pattern, content = compile_spec_pattern(spec["pattern"]), spec["content"]
        return lambda tokens: [pattern.sub(lambda _: content, t) for t in tokens]
    if kind == "WordPiece":
        return _wordpiece(spec.get("prefix", "##"), bool(spec.get("cleanup", True)))
    if kind == "BPEDecoder":
        suffix = spec.get("suffix", "</w>")
        return lambda tokens: [t.replace(suffix, "" if i == len(tokens) - 1 else " ") for i, t in enumerate(tokens)]
    raise TokenizerError(f"decoder {kind!r} is not supported (supported: Sequence, ByteLevel, Metaspace, "
                         "ByteFallback, Fuse, Strip, Replace, WordPiece, BPEDecoder)")


def _run_all(parts: list[Decoder], tokens: list[str]) -> list[str]:
    for part in parts:
        tokens = part(tokens)
    return tokens


def _byte_level(tokens: list[str]) -> list[str]:
    """Byte-level characters back to bytes; a token holding a character outside the table keeps its UTF-8."""
    table, out = unicode_to_bytes(), bytearray()
    for token in tokens:
        try:
            out += bytes(table[c] for c in token)
        except KeyError:
            out += token.encode("utf-8")
    return [out.decode("utf-8", errors="replace")]


def _metaspace(replacement: str, scheme: str) -> Decoder:
    def decode(tokens: list[str]) -> list[str]:
        out = []
        for i, token in enumerate(tokens):
            # As tokenizers does: every marker of the first token is dropped, not only a leading one.
            out.append(token.replace(replacement, "" if i == 0 and scheme != "never" else " "))
        return out

    return decode


def _byte_fallback(tokens: list[str]) -> list[str]:
    """Runs of ``<0xXX>`` tokens become the text their bytes spell (U+FFFD per byte when not valid UTF-8)."""
    out, pending = [], bytearray()

    def flush() -> None:
        if pending:
            try:
                out.append(pending.decode("utf-8"))
            except UnicodeDecodeError:
                out.extend("\ufffd" * len(pending))
            pending.clear()

    for token in tokens:
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                pending.append(int(token[3:5], 16))
                continue
            except ValueError:
                pass
        flush()
        out.append(token)
    flush()
    return out


def _strip(content: str, start: int, stop: int) -> Decoder:
    def decode(tokens: list[str]) -> list[str]:
        out = []
        for token in tokens:
            begin, end = 0, len(token)
            while begin < min(start, end) and token[begin] == content:
                begin += 1
            cut = 0
            while cut < stop and end - 1 >= begin and token[end - 1] == content:
                end -= 1
                cut += 1
            out.append(token[begin:end])
        return out

    return decode


_CLEANUP = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
            (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))


def cleanup_tokenization(text: str) -> str:
    """The WordPiece decoder's clean-up: no space before punctuation and English contractions."""
    for before, after in _CLEANUP:
        text = text.replace(before, after)
    return text


def _wordpiece(prefix: str, cleanup: bool) -> Decoder:
    def decode(tokens: list[str]) -> list[str]:
        out = []
        for i, token in enumerate(tokens):
            if i:
                token = token[len(prefix):] if token.startswith(prefix) else " " + token
            out.append(cleanup_tokenization(token) if cleanup else token)
        return out

    return decode
