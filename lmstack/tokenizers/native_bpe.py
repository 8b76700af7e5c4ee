"""The compiled BPE merge (``csrc/bpe_merge.cpp``, loaded with ctypes: no torch, no Python headers), the
fast path beside ``BPE.merge``, its readable reference; both are tested equal. Long pieces are where it
pays: a SentencePiece-style tokenizer has no pre-tokenizer, so the whole text is one piece.

Built once per machine on first use (``lmstack.native``, about a second); where no compiler is found the
pure-Python merge is used.
"""

import ctypes
import functools
import itertools
import sys
from array import array
from pathlib import Path

from lmstack.native import shared_library

_SOURCE = Path(__file__).with_name("csrc") / "bpe_merge.cpp"
_INT32_P = ctypes.POINTER(ctypes.c_int32)


@functools.cache
def _library():
    try:
        lib = ctypes.CDLL(str(shared_library("lmstack_bpe_merge", [_SOURCE])))
    except Exception as error:  # no compiler, a failed build: the Python merge serves
        print(f"lmstack: compiled BPE merge unavailable ({type(error).__name__}); using the Python one",
              file=sys.stderr)
        return None
    lib.bpe_table_new.restype = ctypes.c_void_p
    lib.bpe_table_new.argtypes = [_INT32_P, _INT32_P, _INT32_P, _INT32_P, ctypes.c_int64]
    lib.bpe_table_free.argtypes = [ctypes.c_void_p]
    lib.bpe_merge.restype = ctypes.c_int64
    lib.bpe_merge.argtypes = [ctypes.c_void_p, _INT32_P, ctypes.c_int64]
    lib.bpe_table_set_vocab.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_int64), _INT32_P,
                                        ctypes.c_int64, ctypes.c_int32, ctypes.c_int32, ctypes.c_int32]
    lib.bpe_encode.restype = ctypes.c_int64
    lib.bpe_encode.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int64, _INT32_P]
    return lib


def _pointer(values: array):
    address, _ = values.buffer_info()
    return ctypes.cast(address, _INT32_P)


class NativeMerger:
    """A merge table held in C++; ``merge(ids)`` equals ``BPE.merge(ids)``. With ``set_vocabulary``,
    ``encode(piece)`` equals ``BPE.merge(BPE.initial_symbols(piece))`` for models without
    continuing-subword prefix or end-of-word suffix."""

    def __init__(self, table: dict[tuple[int, int], tuple[int, int]]) -> None:
        self._lib = _library()
        if self._lib is None:
            raise OSError("the compiled BPE merge is unavailable")
        columns = [array("i", column) for column in zip(*((a, b, r, m) for (a, b), (r, m) in table.items()))] \
            if table else [array("i") for _ in range(4)]
        self._handle = self._lib.bpe_table_new(*map(_pointer, columns), len(table))
        self._free = self._lib.bpe_table_free

    def merge(self, ids: list[int]) -> list[int]:
        values = array("i", ids)
        n = self._lib.bpe_merge(self._handle, _pointer(values), len(values))
        return values[:n].tolist()

    def set_vocabulary(self, vocab: dict[str, int], unk_id: int | None, fuse_unk: bool, byte_fallback: bool) -> None:
        encoded = [token.encode("utf-8") for token in vocab]
        offsets = (ctypes.c_int64 * (len(encoded) + 1))(0, *itertools.accumulate(map(len, encoded)))
        ids = array("i", vocab.values())
        self._lib.bpe_table_set_vocab(self._handle, b"".join(encoded), offsets, _pointer(ids), len(encoded),
                                      -1 if unk_id is None else unk_id, int(fuse_unk), int(byte_fallback))

    def encode(self, piece: str) -> list[int]:
        data = piece.encode("utf-8")
        out = array("i", bytes(4 * len(data)))
        n = self._lib.bpe_encode(self._handle, data, len(data), _pointer(out))
        return out[:n].tolist()

    def __del__(self) -> None:
        handle = getattr(self, "_handle", None)
        if handle:
            self._free(handle)
            self._handle = None


def native_merger(table: dict[tuple[int, int], tuple[int, int]]) -> NativeMerger | None:
    """A NativeMerger for ``table``, or None where the compiled merge cannot be built."""
    try:
        return NativeMerger(table)
    except OSError:
        return None
