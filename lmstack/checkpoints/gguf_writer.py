"""A GGUF v3 container writer: typed metadata, a tensor index and aligned tensor data (the layout
``gguf_reader`` parses; see its docstring). Written to a temporary file and renamed into place.

llama.cpp reads metadata with strict types (a token id must be a UINT32, a flag a BOOL), so every value is
written with an explicit type: ``Value(type, value)`` or, for the common cases, inferred (str -> STRING,
bool -> BOOL, float -> FLOAT32, int -> UINT32 (INT64 if it does not fit), lists of those).
"""

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lmstack.checkpoints.gguf_reader import GGML_TYPES
from lmstack.fileio import atomic_path

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY, UINT64, INT64, FLOAT64 = range(13)
_FORMATS = {UINT8: "<B", INT8: "<b", UINT16: "<H", INT16: "<h", UINT32: "<I", INT32: "<i", FLOAT32: "<f", BOOL: "<?",
            UINT64: "<Q", INT64: "<q", FLOAT64: "<d"}
_TYPE_IDS = {name: type_id for type_id, (name, _, _) in GGML_TYPES.items()}
ALIGNMENT = 32


@dataclass(frozen=True)
class Value:
    """A metadata value with its GGUF type; for arrays, ``type`` is the element type."""

    type: int
    value: Any
    array: bool = False


@dataclass(frozen=True)
class TensorData:
    """A tensor to write: its GGML type name, logical shape (rows first, as torch) and raw data."""

    kind: str
    shape: tuple[int, ...]
    data: np.ndarray


def _infer(value: Any) -> Value:
    if isinstance(value, Value):
        return value
    if isinstance(value, list):
        element = _infer(value[0]).type if value else UINT32
        return Value(element, value, array=True)
    if isinstance(value, bool):
        return Value(BOOL, value)
    if isinstance(value, str):
        return Value(STRING, value)
    if isinstance(value, float):
        return Value(FLOAT32, value)
    if isinstance(value, int):
        return Value(UINT32 if 0 <= value < 2**32 else INT64, value)
    raise TypeError(f"cannot write a GGUF metadata value of type {type(value).__name__}")


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _scalar(type_id: int, value: Any) -> bytes:
    return _string(value) if type_id == STRING else struct.pack(_FORMATS[type_id], value)


def _encode_value(value: Value) -> bytes:
    if not value.array:
        return struct.pack("<I", value.type) + _scalar(value.type, value.value)
    head = struct.pack("<IIQ", ARRAY, value.type, len(value.value))
    if value.type == STRING:
        return head + b"".join(_string(v) for v in value.value)
    return head + np.asarray(value.value, dtype=np.dtype(_FORMATS[value.type][1:]).newbyteorder("<")).tobytes()


def write_gguf(path: str | Path, metadata: dict[str, Any], tensors: dict[str, TensorData]) -> Path:
    """Write a GGUF file: ``metadata`` (key -> value or ``Value``) and ``tensors`` (name -> TensorData)."""
    path = Path(path)
    header = struct.pack("<4sIQQ", b"GGUF", 3, len(tensors), len(metadata))
    kv = b"".join(_string(key) + _encode_value(_infer(value)) for key, value in metadata.items())
    index, blobs, offset = [], [], 0
    for name, tensor in tensors.items():
        dims = tuple(reversed(tensor.shape))  # GGUF lists the fastest-varying dimension first
        index.append(_string(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
                     + struct.pack("<IQ", _TYPE_IDS[tensor.kind], offset))
        blob = np.ascontiguousarray(tensor.data).tobytes()
        padding = (-len(blob)) % ALIGNMENT
        blobs.append(blob + b"\0" * padding)
        offset += len(blob) + padding
    prefix = header + kv + b"".join(index)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(prefix + b"\0" * ((-len(prefix)) % ALIGNMENT))
        for blob in blobs:
            f.write(blob)
    return path
