"""Tokenized datasets on disk: memory-mapped token shards per split, documents joined by EOS.

    DIR/meta.json          dtype, vocab size, EOS id, per split: shard files, tokens, documents, bytes;
                           and a fingerprint of what produced them (sources, tokenizer, split)
    DIR/train_000.bin ...  raw little-endian uint16 (vocabularies up to 65536) or uint32 token ids
    DIR/val_000.bin ...

Each document is followed by EOS, so packed blocks see document boundaries. The directory is written
beside its final place and renamed in, so a crash never leaves a half-written dataset behind.
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from tqdm import tqdm

from lmstack.errors import DataError
from lmstack.fileio import read_json_object, write_json

FORMAT_VERSION = 1


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type holding every id of a ``vocab_size`` vocabulary."""
    return np.dtype("<u2") if vocab_size <= 2**16 else np.dtype("<u4")


def write_token_shards(out_dir: Path, splits: dict[str, Iterable[str]], encode: Callable[[str], list[int]], *,
                       vocab_size: int, eos_id: int, fingerprint: dict, shard_tokens: int = 2**27) -> Path:
    """Tokenize the documents of each split into ``out_dir`` (replaced atomically if it exists).

    Args:
        splits: split name ("train", "val") -> document texts.
        encode: text -> token ids (no EOS; one is appended per document).
        fingerprint: JSON-able description of the inputs, stored so a cache can be checked before reuse.
        shard_tokens: tokens per shard file at most.
    Returns:
        out_dir.
    """
    out_dir = Path(out_dir)
    if not 0 <= eos_id < vocab_size:
        raise DataError(f"EOS id {eos_id} is outside the vocabulary of {vocab_size}")
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = token_dtype(vocab_size)
    meta = {"format": FORMAT_VERSION, "dtype": dtype.str, "vocab_size": vocab_size, "eos_id": eos_id,
            "fingerprint": fingerprint, "splits": {}}
    try:
        for split, texts in splits.items():
            meta["splits"][split] = _write_split(tmp, split, texts, encode, dtype, vocab_size, eos_id, shard_tokens)
        write_json(tmp / "meta.json", meta)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _write_split(directory: Path, split: str, texts: Iterable[str], encode, dtype: np.dtype, vocab_size: int,
                 eos_id: int, shard_tokens: int) -> dict:
    files, buffer, n_tokens, n_docs, n_bytes = [], [], 0, 0, 0

    def flush(n: int) -> None:
        name = f"{split}_{len(files):03d}.bin"
        np.asarray(buffer[:n], dtype=dtype).tofile(directory / name)
        files.append(name)
        del buffer[:n]

    for text in tqdm(list(texts), desc=f"tokenizing {split}", unit="doc", leave=False):
        ids = encode(text)
        if ids and (min(ids) < 0 or max(ids) >= vocab_size):
            raise DataError(f"the tokenizer produced id {max(ids)} outside the vocabulary of {vocab_size}")
        buffer += ids
        buffer.append(eos_id)
        n_tokens, n_docs, n_bytes = n_tokens + len(ids) + 1, n_docs + 1, n_bytes + len(text.encode("utf-8"))
        while len(buffer) >= shard_tokens:
            flush(shard_tokens)
    if buffer or not files:
        flush(len(buffer))
    return {"files": files, "tokens": n_tokens, "documents": n_docs, "bytes": n_bytes}


@dataclass
class TokenShards:
    """A split of a tokenized dataset, memory-mapped: ``shards`` are 1-D arrays of token ids."""

    directory: Path
    split: str
    shards: list[np.ndarray]
    meta: dict

    @property
    def n_tokens(self) -> int:
        return sum(len(s) for s in self.shards)

    @property
    def n_bytes(self) -> int:
        """UTF-8 bytes of the split's text (for bits per byte)."""
        return self.meta["splits"][self.split]["bytes"]


def shards_match(directory: Path, fingerprint: dict, *, required: bool = False) -> bool:
    """Whether ``directory`` holds shards made from the inputs ``fingerprint`` describes (a resumed run, or the
    shards rank 0 of a distributed run just wrote, are reused).

    Raises:
        DataError: ``required`` (a rank that must not write them) and they do not match.
    """
    try:
        if read_meta(directory).get("fingerprint") == fingerprint:
            return True
    except DataError:
        pass
    if required:
        raise DataError(f"{directory}: the token shards rank 0 wrote are missing or were made from other inputs "
                        "(the ranks of a launch must see the same files)")
    return False


def read_meta(directory: Path) -> dict:
    """meta.json of a tokenized dataset; DataError if missing or malformed."""
    meta = read_json_object(Path(directory) / "meta.json", DataError)
    for key in ("dtype", "vocab_size", "eos_id", "splits"):
        if key not in meta:
            raise DataError(f"{directory}/meta.json: missing {key!r}")
    return meta


def open_split(directory: Path, split: str) -> TokenShards:
    """Memory-map the shards of ``split`` ("train" or "val").

    Raises:
        DataError: no such split, a missing shard file, or a file whose size is not whole tokens.
    """
    directory = Path(directory)
    meta = read_meta(directory)
    if split not in meta["splits"]:
        raise DataError(f"{directory}: no {split!r} split (have {sorted(meta['splits'])})")
    dtype = np.dtype(meta["dtype"])
    shards = []
    for name in meta["splits"][split]["files"]:
        path = directory / name
        if not path.is_file():
            raise DataError(f"{path}: shard file missing")
        if path.stat().st_size % dtype.itemsize:
            raise DataError(f"{path}: size {path.stat().st_size} is not a whole number of {dtype} tokens (truncated?)")
        shards.append(np.memmap(path, dtype=dtype, mode="r") if path.stat().st_size else np.zeros(0, dtype))
    total = sum(len(s) for s in shards)
    if total != meta["splits"][split]["tokens"]:
        raise DataError(f"{directory}: {split} shards hold {total} tokens, meta.json says {meta['splits'][split]['tokens']}")
    return TokenShards(directory, split, shards, meta)
