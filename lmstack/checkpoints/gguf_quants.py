"""Dequantisation of GGML block formats to float32, written from ggml's reference C (``dequantize_row_*``).

A quantised tensor is a run of fixed-size blocks; each holds a scale (and for some formats a minimum) as
float16 and packed integer codes. Block sizes in elements / bytes:

    Q8_0 32/34   Q4_0 32/18   Q4_1 32/20   Q5_0 32/22   Q5_1 32/24
    Q2_K 256/84  Q3_K 256/110 Q4_K 256/144 Q5_K 256/176 Q6_K 256/210   (K-quants: 16 or 8 sub-blocks)

Every function takes ``blocks`` (n_blocks, bytes per block) uint8 and returns (n_blocks, elements) float32,
computed in the same order of float32 operations as ggml, so results equal ``gguf.quants.dequantize``
bit for bit (tested). numpy only: no torch, no reference library. ``csrc/dequant.cpp`` is the same
arithmetic compiled (OpenMP, no fused multiply-adds), used by ``dequantize`` where it can be built and
tested equal to these.
"""

import ctypes
import functools
import sys
from pathlib import Path

import numpy as np

from lmstack.errors import CheckpointError
from lmstack.native import shared_library

_CSRC = Path(__file__).with_name("csrc")

QK_K = 256


def _f16(column: np.ndarray) -> np.ndarray:
    """(n, 2) uint8 -> (n, 1) float32 from little-endian float16."""
    return np.ascontiguousarray(column).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, 16) packed bytes -> (n, 32) codes: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """(n, 4) bytes of a little-endian uint32 -> (n, count) of its low ``count`` bits, bit j in column j."""
    word = np.ascontiguousarray(packed).view(np.uint32)  # (n, 1)
    return ((word >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    d, qs = _f16(blocks[:, :2]), blocks[:, 2:].view(np.int8)
    return d * qs.astype(np.float32)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d, q = _f16(blocks[:, :2]), _nibbles(blocks[:, 2:]).astype(np.int8) - np.int8(8)
    return d * q.astype(np.float32)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m, q = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), _nibbles(blocks[:, 4:]).astype(np.float32)
    return d * q + m


def _five_bit(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """Q5 codes: a nibble from ``qs`` plus a fifth bit from the 32-bit ``qh``."""
    return _nibbles(qs) | (_bits(qh, 32) << 4)


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    d, q = _f16(blocks[:, :2]), _five_bit(blocks[:, 2:6], blocks[:, 6:]).astype(np.int8) - np.int8(16)
    return d * q.astype(np.float32)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m = _f16(blocks[:, :2]), _f16(blocks[:, 2:4])
    return d * _five_bit(blocks[:, 4:8], blocks[:, 8:]).astype(np.float32) + m


def _two_bit_planes(qs: np.ndarray) -> np.ndarray:
    """(n, 64) bytes -> (n, 256) 2-bit codes in ggml's order: per 128-element half, 4 shifts x 32 bytes."""
    halves = qs.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (halves & 3).reshape(-1, QK_K)


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    """16 sub-blocks of 16: x = d * (scale & 15) * q - dmin * (scale >> 4)."""
    scales, qs = blocks[:, :16], blocks[:, 16:80]
    d, dmin = _f16(blocks[:, 80:82]), _f16(blocks[:, 82:84])
    dl = (d * (scales & 0x0F).astype(np.float32)).reshape(-1, 16, 1)
    ml = (dmin * (scales >> 4).astype(np.float32)).reshape(-1, 16, 1)
    q = _two_bit_planes(qs).reshape(-1, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(-1, QK_K)


def _q3_scales(packed: np.ndarray) -> np.ndarray:
    """12 bytes -> 16 signed 6-bit scales (low 4 bits from bytes 0..7, high 2 bits from bytes 8..11)."""
    low = np.concatenate([packed[:, :8] & 0x0F, packed[:, :8] >> 4], axis=1)  # (n, 16)
    high = (packed[:, 8:12].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
    return (low | (high.reshape(-1, 16) << 4)).astype(np.int8) - np.int8(32)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    """16 sub-blocks of 16: x = d * scale * (2-bit code - 4 unless its high bit is set)."""
    hmask, qs, scales, d = blocks[:, :32], blocks[:, 32:96], blocks[:, 96:108], _f16(blocks[:, 108:110])
    dl = (d * _q3_scales(scales).astype(np.float32)).reshape(-1, 16, 1)
    high = (hmask.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # (n, 8, 32)
    q = _two_bit_planes(qs).astype(np.int8) - (np.int8(4) * (1 - high.reshape(-1, QK_K)).astype(np.int8))
    return (dl * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, QK_K)


def _k4_scales_mins(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml's get_scale_min_k4 for j = 0..7: 6-bit scales and mins packed in 12 bytes."""
    scales = np.concatenate([packed[:, :4] & 63, (packed[:, 8:12] & 0x0F) | ((packed[:, :4] >> 6) << 4)], axis=1)
    mins = np.concatenate([packed[:, 4:8] & 63, (packed[:, 8:12] >> 4) | ((packed[:, 4:8] >> 6) << 4)], axis=1)
    return scales.astype(np.float32), mins.astype(np.float32)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    """8 sub-blocks of 32: x = d * scale * q - dmin * min."""
    d, dmin, (sc, mn) = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), _k4_scales_mins(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(-1, 8, 32).astype(np.float32)
    return ((d * sc).reshape(-1, 8, 1) * q - (dmin * mn).reshape(-1, 8, 1)).reshape(-1, QK_K)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    """8 sub-blocks of 32: a nibble plus a fifth bit from qh; x = d * scale * q - dmin * min."""
    d, dmin, (sc, mn) = _f16(blocks[:, :2]), _f16(blocks[:, 2:4]), _k4_scales_mins(blocks[:, 4:16])
    qh, ql = blocks[:, 16:48], blocks[:, 48:]
    low = (ql.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    high = (qh.reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1  # sub-block j: bit j
    q = (low.reshape(-1, 8, 32) | (high << 4)).astype(np.float32)
    return ((d * sc).reshape(-1, 8, 1) * q - (dmin * mn).reshape(-1, 8, 1)).reshape(-1, QK_K)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    """16 sub-blocks of 16: a nibble of ql plus 2 bits of qh, minus 32; x = d * scale * q."""
    ql, qh, scales, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208].view(np.int8), _f16(blocks[:, 208:])
    low = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)) & 0x0F  # (n,2,2,64)
    high = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3  # (n,2,4,32)
    q = (low.reshape(-1, 2, 4, 32) | (high << 4)).astype(np.int8) - np.int8(32)
    dl = (d * scales.astype(np.float32)).reshape(-1, 16, 1)
    return (dl * q.reshape(-1, 16, 16).astype(np.float32)).reshape(-1, QK_K)


# format name -> (elements per block, bytes per block, dequantiser)
BLOCK_FORMATS = {
    "Q8_0": (32, 34, dequantize_q8_0), "Q4_0": (32, 18, dequantize_q4_0), "Q4_1": (32, 20, dequantize_q4_1),
    "Q5_0": (32, 22, dequantize_q5_0), "Q5_1": (32, 24, dequantize_q5_1), "Q2_K": (QK_K, 84, dequantize_q2_k),
    "Q3_K": (QK_K, 110, dequantize_q3_k), "Q4_K": (QK_K, 144, dequantize_q4_k), "Q5_K": (QK_K, 176, dequantize_q5_k),
    "Q6_K": (QK_K, 210, dequantize_q6_k),
}
FLOAT_FORMATS = {"F32": np.float32, "F16": np.float16}
SUPPORTED = ("F32", "F16", "BF16", *BLOCK_FORMATS)


@functools.cache
def _native():
    """The compiled dequantisers (``csrc/dequant.cpp``, ctypes; built once per machine), or None."""
    try:
        lib = ctypes.CDLL(str(shared_library("lmstack_dequant", [_CSRC / "dequant.cpp"],
                                             ("-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"))))
    except Exception as error:  # no compiler: the numpy dequantisers serve
        print(f"lmstack: compiled dequantisers unavailable ({type(error).__name__}); using numpy", file=sys.stderr)
        return None
    lib.dequantize.restype = ctypes.c_int
    lib.dequantize.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p]
    return lib


def dequantize(data: np.ndarray, kind: str, n_elements: int, out: np.ndarray | None = None,
               native: bool = True) -> np.ndarray:
    """A GGUF tensor's raw data (bytes, or already-typed float arrays) -> flat float32 of ``n_elements``,
    written into ``out`` (a contiguous float32 array of that size) when given. Block formats use the
    compiled dequantisers when ``native`` and they can be built (equal results), else the numpy ones.

    Raises:
        CheckpointError: an unsupported format, or data whose size does not match ``n_elements``.
    """
    raw = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    if native and kind in BLOCK_FORMATS and _native() is not None:
        per_block, nbytes, _ = BLOCK_FORMATS[kind]
        if n_elements % per_block or raw.size != n_elements // per_block * nbytes:
            raise CheckpointError(f"{kind} data of {raw.size} bytes does not hold {n_elements} elements")
        target = out if out is not None else np.empty(n_elements, dtype=np.float32)
        if target.dtype != np.float32 or target.size != n_elements or not target.flags.c_contiguous:
            raise ValueError("out must be a contiguous float32 array of n_elements")
        _native().dequantize(kind.encode(), raw.ctypes.data, raw.size // nbytes, target.ctypes.data)
        return target.reshape(-1)
    values = _dequantize_numpy(raw, kind, n_elements)
    if out is not None:
        np.copyto(out.reshape(-1), values)
        return out.reshape(-1)
    return values


def _dequantize_numpy(raw: np.ndarray, kind: str, n_elements: int) -> np.ndarray:
    if kind in FLOAT_FORMATS:
        values = raw.view(FLOAT_FORMATS[kind]).astype(np.float32, copy=False)
    elif kind == "BF16":  # the high half of a float32
        values = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    elif kind in BLOCK_FORMATS:
        per_block, nbytes, function = BLOCK_FORMATS[kind]
        if n_elements % per_block or raw.size != n_elements // per_block * nbytes:
            raise CheckpointError(f"{kind} data of {raw.size} bytes does not hold {n_elements} elements")
        values = function(raw.reshape(-1, nbytes)).reshape(-1)
    else:
        raise CheckpointError(f"tensor type {kind} is not supported (supported: {', '.join(SUPPORTED)})")
    if values.size != n_elements:
        raise CheckpointError(f"{kind} data holds {values.size} values, the tensor needs {n_elements}")
    return values


# --- quantisation (GGUF export), as ggml's reference quantize_row_*_ref -----------------------------------

def _round_half_away(x: np.ndarray) -> np.ndarray:
    """C's roundf: halves away from zero (numpy's round goes to even)."""
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def _reciprocal(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, 0, 1 / d)


def quantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    """(n, 32) float32 -> (n, 34) bytes: fp16 scale amax/127, then 32 int8 codes."""
    d = np.abs(blocks).max(axis=1, keepdims=True) / 127
    qs = _round_half_away(blocks * _reciprocal(d)).astype(np.int8).view(np.uint8)
    return np.concatenate([d.astype(np.float16).view(np.uint8), qs], axis=1)


def _pack_q4(codes: np.ndarray) -> np.ndarray:
    """(n, 32) codes in [0, 16) -> (n, 16) bytes: element j in the low nibble of byte j, j + 16 in the high."""
    return codes[:, :16] | (codes[:, 16:] << np.uint8(4))


def quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    """(n, 32) float32 -> (n, 18) bytes: fp16 scale (the value of largest magnitude) / -8, 4-bit codes + 8."""
    largest = np.take_along_axis(blocks, np.abs(blocks).argmax(axis=1, keepdims=True), axis=1)
    d = largest / -8
    codes = np.trunc(blocks * _reciprocal(d) + np.float32(8.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    return np.concatenate([d.astype(np.float16).view(np.uint8), _pack_q4(codes)], axis=1)


def quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    """(n, 32) float32 -> (n, 20) bytes: fp16 scale (max - min) / 15, fp16 min, 4-bit codes."""
    high, low = blocks.max(axis=1, keepdims=True), blocks.min(axis=1, keepdims=True)
    d = (high - low) / 15
    codes = np.trunc((blocks - low) * _reciprocal(d) + np.float32(0.5), dtype=np.float32).astype(np.uint8).clip(0, 15)
    return np.concatenate([d.astype(np.float16).view(np.uint8), low.astype(np.float16).view(np.uint8),
                           _pack_q4(codes)], axis=1)


QUANTIZERS = {"Q8_0": quantize_q8_0, "Q4_0": quantize_q4_0, "Q4_1": quantize_q4_1}


def quantize(values: np.ndarray, kind: str) -> np.ndarray:
    """Flat float32 values -> the raw data of a ``kind`` tensor (F32, F16, Q8_0, Q4_0, Q4_1): a float array
    for F32 / F16, bytes (n_blocks, bytes per block) for the block formats (size a multiple of 32)."""
    values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if kind == "F32":
        return values
    if kind == "F16":
        return values.astype(np.float16)
    return QUANTIZERS[kind](values.reshape(-1, 32))
