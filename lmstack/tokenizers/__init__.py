"""Tokenizers (pure Python, no torch): the tokenizer.json pipeline (BPE, Unigram, WordPiece and every
normalizer / pre-tokenizer / decoder / post-processor the major families publish), BPE training, BERT
WordPiece with offsets, chat templates.

    from lmstack.tokenizers import load_tokenizer, train_bpe
    tok = load_tokenizer("dir")        # tokenizer.json, or vocab.json + merges.txt, or vocab.txt
    ids = tok.encode("Hello"); text = tok.decode(ids)
"""

from pathlib import Path

from lmstack.errors import TokenizerError
from lmstack.tokenizers.bpe import train_bpe
from lmstack.tokenizers.chat import (CHATML_TEMPLATE, ChatEncoding, ChatTemplate, encode_chat, find_chat_template,
                                     load_chat_template, render_chat)
from lmstack.tokenizers.hf_json import load_tokenizer_json, load_vocab_merges, load_vocab_txt, tokenizer_from_json
from lmstack.tokenizers.pipeline import AddedToken, Tokenizer
from lmstack.tokenizers.wordpiece import WordPieceTokenizer


class NoTokenizerError(TokenizerError):
    """A directory holds no tokenizer file at all (callers may treat the tokenizer as optional)."""


def load_tokenizer(path) -> Tokenizer | WordPieceTokenizer:
    """The tokenizer in ``path``: a tokenizer.json file, or a directory holding tokenizer.json,
    vocab.json + merges.txt (GPT-2 BPE) or vocab.txt (BERT WordPiece).

    Raises:
        TokenizerError: nothing readable there, or a malformed file (the message names it).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json" and path.name != "vocab.json":
            return load_tokenizer_json(path)
        if path.name == "vocab.txt":
            return load_vocab_txt(path)
        raise TokenizerError(f"{path}: expected tokenizer.json, vocab.txt or a directory")
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such file or directory")
    if (path / "tokenizer.json").is_file():
        return load_tokenizer_json(path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return load_vocab_merges(path / "vocab.json", path / "merges.txt")
    if (path / "vocab.txt").is_file():
        return load_vocab_txt(path / "vocab.txt")
    raise NoTokenizerError(f"{path}: no tokenizer.json, vocab.json + merges.txt, or vocab.txt")


__all__ = ["AddedToken", "CHATML_TEMPLATE", "ChatEncoding", "ChatTemplate", "NoTokenizerError", "Tokenizer",
           "TokenizerError", "WordPieceTokenizer", "encode_chat", "find_chat_template", "load_chat_template",
           "load_tokenizer", "render_chat", "tokenizer_from_json", "train_bpe"]
