"""SkinnyLinear: nn.Linear with a memory-bandwidth-bound CPU kernel for inputs of at most 8 rows (and a
tiled one for 9 to 64 rows where it beats BLAS: LM heads, batched decoding of a serving engine).

One decoding step multiplies every weight matrix by a handful of rows, so its speed is how fast the
weights stream from memory. ``csrc/skinny_linear.cpp`` (AVX2 + OpenMP) reads each weight row once for
all rows of the input and reaches the machine's streaming bandwidth where BLAS GEMM reaches about half.
It is compiled once per machine on first use (``kernels.build``: needs a C++ compiler and ninja); where it
cannot be built, with autograd on, or for other shapes, dtypes and devices, SkinnyLinear is plain F.linear.
Results equal F.linear up to float summation order (~1e-6 relative).
"""

import torch
import torch.nn.functional as F
from torch import nn

from lmstack.kernels.build import load_cpu_kernels
from lmstack.nn.memory import move_buffers_to_hugepages_, move_to_hugepages_

MAX_ROWS = 8  # the skinny kernels (and the fused decoding step) are specialised for 1 to 8 rows
MEDIUM_ROWS = 64  # the tiled kernel takes 9 to 64 rows where it beats BLAS (``_medium_wins``)


class SkinnyLinear(nn.Module):
    """A drop-in replacement for an nn.Linear that shares its ``weight`` and ``bias`` parameters."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        # The kernel takes an empty tensor for "no bias"; made once, not per call (this is a hot path).
        self._no_bias = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., in_features) -> (..., out_features)."""
        rows = x.numel() // self.in_features
        if rows == 0 or (rows > MAX_ROWS and not self._medium_wins(rows)) or not self._kernel_applies(x):
            return F.linear(x, self.weight, self.bias)
        bias = self._no_bias if self.bias is None else self.bias
        out = load_cpu_kernels().skinny_linear(x.reshape(rows, self.in_features).contiguous(), self.weight, bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _medium_wins(self, rows: int) -> bool:
        """Where the 9-64-row kernel (csrc/skinny_kernels.h medium_matmul) beats BLAS here, measured at 2 threads:
        a wide output (an LM head: 74-90 vs 42-56 GFLOP/s at 16-32 rows), or up to 16 rows of a narrow
        input (99-147 vs 53-106). BLAS keeps the rest (32 rows x 1536 inputs: 118 vs 86)."""
        return rows <= MEDIUM_ROWS and (self.out_features >= 16384 or (rows <= 16 and self.in_features <= 1024))

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        """No autograd (inference), fp32 on CPU, a contiguous weight, and a built kernel."""
        weight = self.weight
        return (load_cpu_kernels() is not None and not torch.is_grad_enabled() and x.dtype is torch.float32
                and x.device.type == "cpu" and weight.dtype is torch.float32 and weight.device.type == "cpu"
                and weight.is_contiguous())

    def decode_operands(self) -> "DecodeOperands":
        """What the fused decoding step reads for this layer (see ``DecodeOperands``)."""
        return DecodeOperands(self.weight, self.bias, FP32, 0, [])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


# Weight formats of the fused decoding step (csrc/decode_step.cpp, enum Format).
FP32, INT8, INT4, NF4 = 0, 1, 2, 3
INT8_DYNAMIC, INT4_DYNAMIC = 4, 5  # stored as INT8 / INT4; activations rounded to int8 per call
SPARSE24 = 6  # a 2:4-sparse fp32 weight's kept half, its position codes in aux slot 0 (compress.semi_sparse)
AUX_SLOTS = 6


class DecodeOperands:
    """A linear layer as the fused decoding step reads it: the weight tensor (fp32 matrix, or packed codes),
    the bias, the format code and group size, and up to six auxiliary tensors in the slots of
    decode_step.cpp's ``Format`` comment. A module that offers ``decode_operands()`` can run in the fused
    step (SkinnyLinear, lmstack.compress.QuantizedLinear); any other module keeps the model on the eager path."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, format: int, group: int,
                 aux: list[torch.Tensor | None]) -> None:
        self.weight, self.bias, self.format, self.group = weight, bias, format, group
        empty = torch.empty(0)
        self.aux = [empty if t is None else t for t in aux] + [empty] * (AUX_SLOTS - len(aux))


def use_skinny_linears_(model: nn.Module, hugepages: bool = True) -> nn.Module:
    """Replace every nn.Linear in ``model`` by a SkinnyLinear sharing its parameters (in place; returns model).

    State-dict names and tied weights are unchanged; training and large batches still use F.linear.
    With ``hugepages`` (Linux), the linear weights (and any large buffers: quantized layers' codes) are also
    moved into one memory arena backed by 2 MiB pages: a decoding step streams ~every weight once, and with 4 KiB pages (or weights still mapped
    from a safetensors file) address translation, not DRAM, becomes the limit (measured: ~20% slower).
    """
    skinny = []
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                skinny.append(SkinnyLinear(child))
                setattr(module, child_name, skinny[-1])
    if hugepages:
        move_to_hugepages_([s.weight for s in skinny])
        move_buffers_to_hugepages_(model)  # quantized layers' codes and scales (two runs: +4% int8, +19% int4 decoding)
    return model
