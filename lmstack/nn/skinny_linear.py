"""SkinnyLinear: nn.Linear with a memory-bandwidth-bound CPU kernel for inputs of at most 8 rows.

One decoding step multiplies every weight matrix by a handful of rows, so its speed is how fast the
weights stream from memory. ``csrc/skinny_linear.cpp`` (AVX2 + OpenMP) reads each weight row once for
all rows of the input and reaches the machine's streaming bandwidth where BLAS GEMM reaches about half.
It is compiled on first use with torch's extension builder (needs a C++ compiler and ninja; cached);
where it cannot be built, with autograd on, or for other shapes, dtypes and devices, SkinnyLinear is plain
F.linear.
Results equal F.linear up to float summation order (~1e-6 relative).
"""

import functools
import hashlib
import logging
import mmap
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
MAX_ROWS = 8  # the kernels are specialised for 1 to 8 rows


_SOURCES = ("extension.cpp", "skinny_linear.cpp", "decode_step.cpp")


@functools.cache
def load_kernel():
    """The compiled extension module (``skinny_linear``, ``decode_step``), or None if this machine cannot
    build or run it."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        from torch.utils.cpp_extension import load

        csrc = Path(__file__).with_name("csrc")
        # The build is cached by name: hash every source and header into it so an edit means a rebuild.
        digest = hashlib.sha256(b"".join(f.read_bytes() for f in sorted(csrc.iterdir()) if f.is_file())).hexdigest()
        return load(f"lmstack_cpu_kernels_{digest[:12]}", [str(csrc / name) for name in _SOURCES],
                    extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as error:  # no compiler, no ninja, ...: fall back to F.linear
        log.warning("CPU decoding kernels unavailable (%s); using F.linear", error)
        return None


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
        if rows > MAX_ROWS or rows == 0 or not self._kernel_applies(x):
            return F.linear(x, self.weight, self.bias)
        bias = self._no_bias if self.bias is None else self.bias
        out = load_kernel().skinny_linear(x.reshape(rows, self.in_features).contiguous(), self.weight, bias)
        return out.view(*x.shape[:-1], self.out_features)

    def _kernel_applies(self, x: torch.Tensor) -> bool:
        """No autograd (inference), fp32 on CPU, a contiguous weight, and a built kernel."""
        weight = self.weight
        return (load_kernel() is not None and not torch.is_grad_enabled() and x.dtype is torch.float32
                and x.device.type == "cpu" and weight.dtype is torch.float32 and weight.device.type == "cpu"
                and weight.is_contiguous())

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def use_skinny_linears_(model: nn.Module, hugepages: bool = True) -> nn.Module:
    """Replace every nn.Linear in ``model`` by a SkinnyLinear sharing its parameters (in place; returns model).

    State-dict names and tied weights are unchanged; training and large batches still use F.linear.
    With ``hugepages`` (Linux), the linear weights are also moved into one memory arena backed by 2 MiB
    pages: a decoding step streams ~every weight once, and with 4 KiB pages (or weights still mapped
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
    return model


_HUGE_PAGE = 2 * 2**20


@torch.no_grad()
def move_to_hugepages_(params: list[nn.Parameter]) -> None:
    """Copy CPU fp32 parameters into one anonymous mapping advised to use transparent huge pages.

    Each Parameter keeps its identity (only ``.data`` moves), so tied weights stay tied. A no-op where
    the platform has no MADV_HUGEPAGE.
    """
    unique = list({id(p): p for p in params if p.device.type == "cpu" and p.dtype == torch.float32}.values())
    if not unique or not hasattr(mmap, "MADV_HUGEPAGE"):
        return
    spans = [-(-p.numel() * 4 // _HUGE_PAGE) * _HUGE_PAGE for p in unique]  # each starts on a 2 MiB boundary
    # Private anonymous memory: a shared mapping (mmap's default) is shmem, which THP leaves alone.
    arena = mmap.mmap(-1, sum(spans) + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    arena.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(arena, dtype=torch.uint8)  # keeps the mapping alive as long as any view
    offset = -memory.data_ptr() % _HUGE_PAGE
    for param, span in zip(unique, spans):
        view = memory[offset:offset + param.numel() * 4].view(torch.float32).view(param.shape)
        view.copy_(param.data)
        param.data = view
        offset += span
