"""Safe checkpoint I/O: safetensors reading with validation, shard indexes, and atomic writes.

Only safetensors and JSON are read; nothing is unpickled. Every write goes to a temporary file in the
same directory and is renamed into place, so an interrupted save never leaves a half-written file where
a good one was.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmstack.errors import CheckpointError
from lmstack.fileio import atomic_path, read_json_object, write_json  # noqa: F401  (re-exported)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
_MAX_HEADER_BYTES = 100 * 1024 * 1024
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


@dataclass(frozen=True)
class TensorInfo:
    """Where a tensor lives and what it is, read from a safetensors header without loading data."""

    file: Path
    name: str  # the name as stored in the file
    dtype: str  # safetensors dtype code, e.g. "F32", "BF16"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return _DTYPES.get(self.dtype)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header: names, dtypes, shapes, and that the data is all there.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is corrupted.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise CheckpointError(f"{path}: corrupted or truncated safetensors header "
                                  f"(declares {header_len} header bytes, file has {size})")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise CheckpointError(f"{path}: corrupted safetensors header ({error})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupted safetensors header (not a JSON object)")
    return _tensor_infos(path, header, data_bytes=size - 8 - header_len)


def _tensor_infos(path: Path, header: dict[str, Any], data_bytes: int) -> dict[str, TensorInfo]:
    infos, data_end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupted safetensors header entry for tensor {name!r}") from None
        if not 0 <= start <= end:
            raise CheckpointError(f"{path}: corrupted offsets for tensor {name!r}")
        infos[name] = TensorInfo(path, name, dtype, shape)
        data_end = max(data_end, end)
    if data_end > data_bytes:
        raise CheckpointError(f"{path}: truncated safetensors file (header needs {data_end} bytes of tensor data, "
                              f"file holds {data_bytes})")
    return infos


def index_checkpoint(directory: Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint directory: ``model.safetensors`` or a sharded index.

    Raises:
        CheckpointError: no weights file, an index naming a missing shard or a tensor absent from its shard.
    """
    directory = Path(directory)
    index_path, single = directory / INDEX_FILE, directory / SINGLE_FILE
    if index_path.is_file():
        weight_map = read_json(index_path).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_path}: no 'weight_map' object")
        infos: dict[str, TensorInfo] = {}
        shards = {}
        for shard in weight_map.values():
            path = _shard_path(directory, index_path, shard)  # checks the name before it is used at all
            shards[shard] = path
        for shard in sorted(shards):
            infos.update(read_safetensors_header(shards[shard]))
        for name, shard in weight_map.items():
            if name not in infos or infos[name].file.name != shard:
                raise CheckpointError(f"{index_path}: tensor {name!r} is listed in {shard} but not stored there")
        return infos
    if single.is_file():
        return read_safetensors_header(single)
    found = sorted(p.name for p in directory.glob("*"))[:10]
    hint = " (PyTorch .bin checkpoints are not read: they need unpickling; convert them to safetensors)" \
        if any(name.endswith((".bin", ".pt", ".pth")) for name in found) else ""
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}{hint}; found {found}")


def _shard_path(directory: Path, index_path: Path, shard) -> Path:
    """The shard file an index names, refused before it is opened if the name is not a plain relative path
    that stays inside the checkpoint directory once symlinks are resolved."""
    if not isinstance(shard, str) or not shard or Path(shard).is_absolute():
        raise CheckpointError(f"{index_path}: shard name {shard!r} must be a file name inside the checkpoint")
    path = directory / shard
    try:
        inside = path.resolve().is_relative_to(directory.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        inside = False
    if not inside:
        raise CheckpointError(f"{index_path}: shard name {shard!r} leads outside the checkpoint directory")
    return path


def load_tensors(file: Path, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for ``names`` from one safetensors file, on CPU."""
    try:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in names:
                yield name, f.get_tensor(name)
    except Exception as error:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{file}: cannot read tensors ({error})") from None


def read_json(path: Path) -> dict[str, Any]:
    """Parse a JSON object from ``path`` with errors naming the file."""
    return read_json_object(path, CheckpointError)


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write ``tensors`` to a safetensors file, atomically."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "5GB", "500MB", "2GiB"."""
    if isinstance(size, int):
        return size
    text = size.strip().upper()
    if text.isdigit():  # a number of bytes, as the error below offers
        return int(text)
    units = {"GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "GB": 10**9, "MB": 10**6, "KB": 10**3, "B": 1}
    for unit, factor in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * factor)
            except ValueError:
                break
    raise CheckpointError(f"cannot read size {size!r}; use e.g. '5GB', '500MB' or a number of bytes")
