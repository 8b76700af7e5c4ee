"""Which x86 instruction set the compiled kernels target: AVX2 + FMA everywhere, plus AVX-512 VNNI where this
CPU has it (vpdpbusd: the integer dot products of the int8-activation kernels in one instruction; see
csrc/dynamic_kernels.h). The choice is part of each library's build key, so a cache never hands a VNNI build
to a CPU without VNNI.

``LMSTACK_CPU_ISA=avx2`` forces the AVX2 build (tests use it to run that path on a VNNI machine);
``LMSTACK_CPU_ISA=avx512-vnni`` asks for VNNI and is an error on a CPU without it.
"""

import functools
import os
from pathlib import Path

from lmstack.errors import ConfigError

AVX2_FLAGS = ("-mavx2", "-mfma")
VNNI_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni")
_VNNI_CPU_FLAGS = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
CHOICES = ("avx2", "avx512-vnni")


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags Linux reports for the first CPU (empty where /proc/cpuinfo is absent)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.partition(":")[2].split())
    return frozenset()


def kernel_isa() -> str:
    """"avx512-vnni" where the CPU has it (and LMSTACK_CPU_ISA does not say avx2), else "avx2"."""
    asked = os.environ.get("LMSTACK_CPU_ISA", "").strip().lower()
    has_vnni = _VNNI_CPU_FLAGS <= cpu_flags()
    if asked and asked not in CHOICES:
        raise ConfigError(f"LMSTACK_CPU_ISA={asked!r}: choose one of {', '.join(CHOICES)} (or leave it unset)")
    if asked == "avx512-vnni" and not has_vnni:
        raise ConfigError("LMSTACK_CPU_ISA=avx512-vnni, but this CPU lacks AVX-512 VNNI")
    return asked or ("avx512-vnni" if has_vnni else "avx2")


def isa_flags() -> tuple[str, ...]:
    """Compiler flags for ``kernel_isa()``."""
    return AVX2_FLAGS + (VNNI_FLAGS if kernel_isa() == "avx512-vnni" else ())
