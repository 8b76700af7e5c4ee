"""Tokenizers (pure Python, no torch): byte-level BPE training/encoding and Hugging Face file formats.

    from lmstack.tokenizers import load_tokenizer, train_bpe
    tok = load_tokenizer("dir")        # tokenizer.json, or vocab.json + merges.txt
    ids = tok.encode("Hello"); text = tok.decode(ids)
"""

from pathlib import Path

from lmstack.tokenizers.bpe import AddedToken, BPETokenizer, TokenizerError, train_bpe
from lmstack.tokenizers.chat import CHATML_TEMPLATE, ChatEncoding, encode_chat, load_chat_template, render_chat
from lmstack.tokenizers.hf_json import load_tokenizer_json, load_vocab_merges


def load_tokenizer(path) -> BPETokenizer:
    """The tokenizer in ``path``: a tokenizer.json file, or a directory holding tokenizer.json or
    vocab.json + merges.txt.

    Raises:
        TokenizerError: nothing readable there, or a malformed file (the message names it).
    """
    path = Path(path)
    if path.is_file():
        if path.suffix == ".json" and path.name != "vocab.json":
            return load_tokenizer_json(path)
        raise TokenizerError(f"{path}: expected tokenizer.json or a directory")
    if not path.is_dir():
        raise TokenizerError(f"{path}: no such file or directory")
    if (path / "tokenizer.json").is_file():
        return load_tokenizer_json(path / "tokenizer.json")
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return load_vocab_merges(path / "vocab.json", path / "merges.txt")
    if (path / "vocab.txt").is_file():
        raise TokenizerError(f"{path}: vocab.txt (WordPiece) is not supported yet; it arrives with the rest of "
                             "the tokenizers issue")
    raise TokenizerError(f"{path}: no tokenizer.json, vocab.json + merges.txt, or vocab.txt")


__all__ = ["AddedToken", "BPETokenizer", "CHATML_TEMPLATE", "ChatEncoding", "TokenizerError", "encode_chat",
           "load_chat_template", "load_tokenizer", "render_chat", "train_bpe"]
