"""Pre-tokenization for byte-level BPE: split text into words with a regex, map bytes to printable characters.

GPT-2's byte-to-unicode table (Radford et al. 2019) maps each of the 256 bytes to a printable character,
so any UTF-8 text becomes a string BPE can merge and decoding can invert exactly.
"""

import functools

import regex

# The GPT-2 split: contractions, letters, numbers, other symbols, each optionally led by one space.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# cl100k / Llama-3 / Qwen2: case-insensitive contractions, digits in groups of at most three.
CL100K_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                  r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2: as cl100k, but digits one at a time.
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
PATTERNS = {"gpt2": GPT2_PATTERN, "cl100k": CL100K_PATTERN, "llama3": CL100K_PATTERN}


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: printable bytes map to themselves, the others to characters from U+0100 upward."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    return {char: byte for byte, char in bytes_to_unicode().items()}


@functools.cache
def compile_pattern(pattern: str) -> regex.Pattern:
    return regex.compile(pattern)


def to_byte_chars(piece: str) -> str:
    """UTF-8 bytes of ``piece`` as byte-level characters (bytes seen as Latin-1 code points, then mapped
    by one C-level ``str.translate``)."""
    return piece.encode("utf-8").decode("latin-1").translate(bytes_to_unicode())


def from_byte_chars(chars: str) -> bytes:
    """Inverse of ``to_byte_chars`` (characters outside the table are encoded as UTF-8)."""
    table = unicode_to_bytes()
    out = bytearray()
    for char in chars:
        byte = table.get(char)
        if byte is None:
            out += char.encode("utf-8")
        else:
            out.append(byte)
    return bytes(out)
