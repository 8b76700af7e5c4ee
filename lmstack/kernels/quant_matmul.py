"""ctypes bindings of ``csrc/quant_matmul.cpp``: skinny matmuls over int8 / int4 / NF4 weights and row-range
dequantisation, compiled once per machine (``lmstack.native``; a plain C library, a few seconds to build).

Every function takes and returns torch tensors; callers check shapes and dtypes (``QuantizedLinear``).
``quant_kernels()`` is None where the library cannot be built or the CPU lacks AVX2: callers then use
their eager reference paths.
"""

import ctypes
import functools
import logging
from pathlib import Path

import torch

from lmstack.kernels.isa import isa_flags
from lmstack.native import shared_library

log = logging.getLogger(__name__)
_CSRC = Path(__file__).with_name("csrc")
_SOURCE = _CSRC / "quant_matmul.cpp"
_FLAGS = ("-O3", "-std=c++17", "-fopenmp")  # and the instruction set's (lmstack.kernels.isa)
MAX_ROWS = 8

_P, _I64, _INT, _F = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
_SIGNATURES = {
    "lmstack_int8_matmul": (ctypes.c_int, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "lmstack_int4_matmul": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "lmstack_int8_dynamic_matmul": (ctypes.c_int, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "lmstack_int4_dynamic_matmul": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "lmstack_nf4_matmul": (ctypes.c_int, [_P, _P, _P, _P, _P, _P, _F, _P, _P, _I64, _I64, _I64, _INT]),
    "lmstack_sparse24_matmul": (ctypes.c_int, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _INT]),
    "lmstack_dynamic_gemm": (ctypes.c_int, [_P, _P, _INT, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "lmstack_fake_quantize_activations": (None, [_P, _P, _I64, _I64, _I64, _INT]),
    "lmstack_int8_dequant": (None, [_P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "lmstack_int4_dequant": (None, [_P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _INT]),
    "lmstack_nf4_dequant": (None, [_P, _P, _P, _P, _I64, _I64, _I64, _INT]),
}


@functools.cache
def quant_kernels() -> ctypes.CDLL | None:
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        lib = ctypes.CDLL(str(shared_library("lmstack_quant_matmul", [_SOURCE], _FLAGS + isa_flags(), sorted(_CSRC.glob("*.h")))))
    except Exception as error:  # no compiler: the eager paths remain
        log.warning("quantized CPU kernels unavailable (%s); using the eager paths", error)
        return None
    for name, (restype, argtypes) in _SIGNATURES.items():
        getattr(lib, name).restype, getattr(lib, name).argtypes = restype, argtypes
    return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def sparse24_matmul(x, values, codes, bias):
    """x (rows, in) fp32 with 1 <= rows <= 8 and in a multiple of 32 -> (rows, out), over a 2:4-sparse weight
    packed by ``lmstack.compress.semi_sparse.pack_2of4`` (values (out, in / 2), codes (out, in / 8))."""
    y = torch.empty(x.shape[0], values.shape[0])
    failed = quant_kernels().lmstack_sparse24_matmul(x.data_ptr(), values.data_ptr(), codes.data_ptr(), _ptr(bias),
                                                     y.data_ptr(), x.shape[0], values.shape[0], x.shape[1],
                                                     torch.get_num_threads())
    if failed:
        raise ValueError(f"sparse24_matmul: unsupported shape x {tuple(x.shape)}, values {tuple(values.shape)}")
    return y


def int8_matmul(x, qweight, scales, bias, group_size: int = 0, dynamic: bool = False):
    """x (rows, in) fp32 with 1 <= rows <= 8 -> (rows, out); scales per row (group_size 0) or per group.
    ``dynamic``: x is quantized to int8 first, per row or per group (csrc/dynamic_kernels.h)."""
    y = torch.empty(x.shape[0], qweight.shape[0])
    kernel = quant_kernels().lmstack_int8_dynamic_matmul if dynamic else quant_kernels().lmstack_int8_matmul
    code = kernel(_ptr(x), _ptr(qweight), _ptr(scales), _ptr(bias), _ptr(y), x.shape[0], qweight.shape[0], x.shape[1],
                  group_size, torch.get_num_threads())
    assert code == 0, "int8_matmul: unsupported shape"
    return y


def int4_matmul(x, qweight, scales, zeros, mins, bias, group_size: int, dynamic: bool = False):
    """Integer ``zeros``, or float ``mins`` (weight = code * scale + min) with zeros None. ``dynamic``: x is
    quantized to int8 per group first."""
    y = torch.empty(x.shape[0], qweight.shape[0])
    kernel = quant_kernels().lmstack_int4_dynamic_matmul if dynamic else quant_kernels().lmstack_int4_matmul
    code = kernel(_ptr(x), _ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(mins), _ptr(bias), _ptr(y), x.shape[0],
                  qweight.shape[0], x.shape[1], group_size, torch.get_num_threads())
    assert code == 0, "int4_matmul: unsupported shape"
    return y


def dynamic_gemm(x, qweight, scales, zeros, mins, bias, group_size: int) -> torch.Tensor | None:
    """x (rows, in) fp32, any rows -> (rows, out) = quantize(x) @ W^T + bias with int8 activations (per token for
    per-row int8, group 0; else per weight group) as integer products (csrc/dynamic_gemm.h); int8 ``qweight``
    (out, in), or int4 (out, in / 2) with ``zeros`` or ``mins``. None where this build has no such kernel
    (without AVX-512 VNNI) or the shape is not one it takes."""
    y = torch.empty(x.shape[0], qweight.shape[0])
    int4 = qweight.dtype is torch.uint8
    code = quant_kernels().lmstack_dynamic_gemm(_ptr(x), _ptr(qweight), int(int4), _ptr(scales), _ptr(zeros), _ptr(mins),
                                                _ptr(bias), _ptr(y), x.shape[0], qweight.shape[0], x.shape[1],
                                                group_size, torch.get_num_threads())
    return None if code else y


def nf4_matmul(x, qweight, levels, absmax_codes, absmax_code, absmax_scales, offset: float, bias):
    """With ``absmax_codes`` None, ``absmax_code`` is the plain per-block absmax."""
    y = torch.empty(x.shape[0], qweight.shape[0])
    code = quant_kernels().lmstack_nf4_matmul(_ptr(x), _ptr(qweight), _ptr(levels), _ptr(absmax_codes),
                                              _ptr(absmax_code), _ptr(absmax_scales), offset, _ptr(bias), _ptr(y),
                                              x.shape[0], qweight.shape[0], x.shape[1], torch.get_num_threads())
    assert code == 0, "nf4_matmul: unsupported shape"
    return y


def fake_quantize_activations(x, block: int | None) -> torch.Tensor:
    """x (rows, n) contiguous fp32, n a multiple of 32 -> each value as its int8 code times the code's scale
    (``formats.fake_quantize_activations``: per row with block None, else per block)."""
    y = torch.empty_like(x)
    quant_kernels().lmstack_fake_quantize_activations(_ptr(x), _ptr(y), x.shape[0], x.shape[1], block or 0,
                                                      torch.get_num_threads())
    return y


def int8_dequant(qweight, scales, start: int, stop: int, group_size: int = 0) -> torch.Tensor:
    out = torch.empty(stop - start, qweight.shape[1])
    quant_kernels().lmstack_int8_dequant(_ptr(qweight), _ptr(scales), _ptr(out), start, stop, qweight.shape[1],
                                         group_size, torch.get_num_threads())
    return out


def int4_dequant(qweight, scales, zeros, mins, start: int, stop: int, group_size: int) -> torch.Tensor:
    n_in = qweight.shape[1] * 2
    out = torch.empty(stop - start, n_in)
    quant_kernels().lmstack_int4_dequant(_ptr(qweight), _ptr(scales), _ptr(zeros), _ptr(mins), _ptr(out), start, stop, n_in,
                                         group_size, torch.get_num_threads())
    return out


def nf4_dequant(qweight, levels, absmax, start: int, stop: int) -> torch.Tensor:
    n_in = qweight.shape[1] * 2
    out = torch.empty(stop - start, n_in)
    quant_kernels().lmstack_nf4_dequant(_ptr(qweight), _ptr(levels), _ptr(absmax), _ptr(out), start, stop, n_in,
                                        torch.get_num_threads())
    return out
