"""What `lmstack tokenizer train | encode | decode` take."""

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from lmstack.config import field


@dataclass
class TrainTokenizerConfig:
    """Train a byte-level BPE tokenizer on text files and save tokenizer.json."""

    input: str = field(help="text files: paths or globs, comma-separated (e.g. 'data/*.txt')")
    out: Path = field(help="directory to write tokenizer.json into")
    vocab_size: int = field(8000, help="vocabulary size, the 256 bytes and special tokens included")
    special_tokens: str = field("<|endoftext|>", help="comma-separated special tokens (given the first ids)")
    pattern: Literal["gpt2", "cl100k", "llama3"] = field("gpt2", help="word-splitting regex")


@dataclass
class EncodeConfig:
    """Encode text to token ids (one JSON list per input line)."""

    tokenizer: Path = field(help="tokenizer.json, or a directory holding one")
    text: str | None = field(None, help="text to encode (default: read lines from standard input)")
    add_special_tokens: bool = field(True, help="add BOS/EOS as the tokenizer's post-processor says")


@dataclass
class DecodeConfig:
    """Decode token ids (spaces or commas between them) to text."""

    tokenizer: Path = field(help="tokenizer.json, or a directory holding one")
    ids: str = field(help="token ids, e.g. '464 2068 7586'")
    skip_special_tokens: bool = field(False, help="leave special tokens out of the text")
