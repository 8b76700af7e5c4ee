"""A GGUF container reader: header, metadata and tensor index parsed from a memory map, data left in place.

Layout (GGUF v2/v3, little-endian): "GGUF", version u32, tensor count u64, metadata count u64; each
metadata entry is a key string (u64 length + UTF-8), a value type u32 and the value (arrays: element type
u32, count u64, elements); each tensor entry is a name, n_dims u32, dims u64 (fastest-varying first), a
GGML type u32 and an offset u64 into the data section, which starts at the next ``general.alignment``
(default 32) boundary. Numeric arrays are read in bulk, so a 150k-token vocabulary parses in milliseconds
(the ``gguf`` package's reader takes seconds for it; it is this module's reference in the tests).
Every size is checked against the file before anything is allocated: a truncated or corrupted file is a
CheckpointError naming it, never a crash or a huge allocation.
"""

import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.errors import CheckpointError

# GGML type id -> (name, elements per block, bytes per block)
GGML_TYPES = {0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
              7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84),
              11: ("Q3_K", 256, 110), 12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210),
              15: ("Q8_K", 256, 292), 16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98),
              19: ("IQ1_S", 256, 50), 20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82),
              23: ("IQ4_XS", 256, 136), 24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8),
              28: ("F64", 1, 8), 29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54),
              35: ("TQ2_0", 256, 66), 39: ("MXFP4", 32, 17)}
# metadata value type -> numpy dtype (scalars and array elements); 7 is bool, 8 string, 9 array
_NUMERIC = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
            7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_U64 = struct.Struct("<Q")


class _Cursor:
    """Bounds-checked little-endian reads from a buffer."""

    def __init__(self, buffer, path: Path) -> None:
        self.buffer, self.path, self.pos, self.size = buffer, path, 0, len(buffer)

    def take(self, n: int) -> int:
        if n < 0 or self.pos + n > self.size:
            raise CheckpointError(f"{self.path}: truncated GGUF file (needs {n} bytes at offset {self.pos}, "
                                  f"the file has {self.size})")
        start, self.pos = self.pos, self.pos + n
        return start

    def unpack(self, fmt: str):
        start = self.take(struct.calcsize(fmt))
        return struct.unpack_from(fmt, self.buffer, start)[0]

    def string(self) -> str:
        n = self.unpack("<Q")
        start = self.take(n)
        try:
            return bytes(self.buffer[start:start + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: a metadata string at offset {start} is not UTF-8") from None

    def strings(self, count: int) -> list[str]:
        """``count`` strings in a row (a vocabulary): one tight loop, as this is most of a file's metadata."""
        if count > (self.size - self.pos) // 8:  # every string takes at least its 8-byte length
            raise CheckpointError(f"{self.path}: corrupted GGUF file (an array claims {count} strings)")
        buffer, pos, size, length_at, out = self.buffer, self.pos, self.size, _U64.unpack_from, []
        try:
            for _ in range(count):
                (n,) = length_at(buffer, pos)
                end = pos + 8 + n
                if end > size:
                    raise CheckpointError(f"{self.path}: truncated GGUF file (a string at offset {pos} runs past "
                                          "the end)")
                out.append(buffer[pos + 8:end].decode("utf-8"))
                pos = end
        except struct.error:
            raise CheckpointError(f"{self.path}: truncated GGUF file (a string length at offset {pos})") from None
        except UnicodeDecodeError:
            raise CheckpointError(f"{self.path}: a metadata string at offset {pos} is not UTF-8") from None
        self.pos = pos
        return out

    def value(self, kind: int) -> Any:
        if kind == _STRING:
            return self.string()
        if kind == _ARRAY:
            element, count = self.unpack("<I"), self.unpack("<Q")
            if element == _STRING:
                return self.strings(count)
            if element not in _NUMERIC:
                raise CheckpointError(f"{self.path}: unsupported metadata array element type {element}")
            dtype = np.dtype(_NUMERIC[element])
            start = self.take(count * dtype.itemsize)
            return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=start).tolist()
        if kind not in _NUMERIC:
            raise CheckpointError(f"{self.path}: unsupported metadata value type {kind} at offset {self.pos}")
        dtype = np.dtype(_NUMERIC[kind])
        start = self.take(dtype.itemsize)
        return np.frombuffer(self.buffer, dtype=dtype, count=1, offset=start)[0].item()


def parse_gguf(path: Path) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...], np.ndarray]]]:
    """(metadata, [(tensor name, GGML type name, shape rows-first, raw data as a uint8 view)]) of ``path``.

    Raises:
        CheckpointError: not a GGUF file, an unsupported version, or truncated / corrupted contents.
    """
    try:
        with open(path, "rb") as f:
            buffer = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except (OSError, ValueError) as error:  # ValueError: an empty file cannot be mapped
        raise CheckpointError(f"{path}: cannot read ({error})") from None
    cursor = _Cursor(buffer, path)
    if cursor.size < 24 or bytes(buffer[:4]) != b"GGUF":
        raise CheckpointError(f"{path}: not a GGUF file (no GGUF magic)")
    cursor.take(4)
    version = cursor.unpack("<I")
    if version not in (2, 3):
        raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_metadata = cursor.unpack("<Q"), cursor.unpack("<Q")
    if n_tensors > cursor.size or n_metadata > cursor.size:
        raise CheckpointError(f"{path}: corrupted GGUF header ({n_tensors} tensors, {n_metadata} metadata entries)")
    metadata = {}
    for _ in range(n_metadata):
        key = cursor.string()
        metadata[key] = cursor.value(cursor.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name, n_dims = cursor.string(), cursor.unpack("<I")
        if n_dims > 8:
            raise CheckpointError(f"{path}: tensor {name!r} claims {n_dims} dimensions")
        dims = [cursor.unpack("<Q") for _ in range(n_dims)]
        infos.append((name, dims, cursor.unpack("<I"), cursor.unpack("<Q")))
    alignment = int(metadata.get("general.alignment", 32))
    if alignment <= 0 or alignment & (alignment - 1):
        raise CheckpointError(f"{path}: general.alignment {alignment} is not a power of two")
    data_start = -(-cursor.pos // alignment) * alignment
    return metadata, [_tensor(buffer, path, data_start, *info) for info in infos]


def _tensor(buffer, path: Path, data_start: int, name: str, dims: list[int], type_id: int, offset: int):
    if type_id not in GGML_TYPES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown GGML type {type_id}")
    kind, per_block, block_bytes = GGML_TYPES[type_id]
    n = int(np.prod(dims)) if dims else 1
    if n % per_block:
        raise CheckpointError(f"{path}: tensor {name!r} has {n} elements, not a whole number of {kind} blocks")
    nbytes = n // per_block * block_bytes
    start = data_start + offset
    if start + nbytes > len(buffer):
        raise CheckpointError(f"{path}: truncated GGUF file (tensor {name!r} needs bytes {start}..{start + nbytes}, "
                              f"the file has {len(buffer)})")
    data = np.frombuffer(buffer, dtype=np.uint8, count=nbytes, offset=start)
    return name, kind, tuple(reversed(dims)), data
