"""Build-once cache of lmstack's C++ CPU kernels (``csrc/``), in ``lmstack.native``'s verified cache.

The key covers the sources and headers, the compiler's version, the flags, torch's version and the
Python ABI; loading a cached library is a plain extension-module import (milliseconds, no compiler). A
build runs only when a caller needs the kernels and the cache holds no verified library: it says so on
stderr, compiles in a private temporary folder and renames the result into place (see ``native``).
"""

import functools
import importlib.machinery
import importlib.util
import logging
import sys
import sysconfig
import time
from pathlib import Path

from lmstack.kernels.isa import isa_flags
from lmstack.native import build_artifact, cache_root, cached_artifact, compiler_version, content_key, prepare_cache_root

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("extension.cpp", "skinny_linear.cpp", "decode_step.cpp", "paged_attention.cpp")
MODULE = "lmstack_cpu_kernels"
CFLAGS = ("-O3", "-fopenmp")  # and the instruction set's (lmstack.kernels.isa)
LDFLAGS = ("-fopenmp",)
BUILD_SECONDS = 120  # what a first build takes on the 2-core reference machine


@functools.cache
def build_key() -> str:
    """Hash of the sources, compiler, flags, torch version and Python ABI."""
    import torch

    # The extension's own sources and the headers they include; not quant_matmul.cpp (a ctypes library
    # with its own cache entry), so editing it does not rebuild the extension.
    files = sorted([CSRC / name for name in SOURCES] + list(CSRC.glob("*.h")))
    return content_key(files, compiler_version(), " ".join(CFLAGS + isa_flags() + LDFLAGS), torch.__version__,
                       sysconfig.get_config_var("SOABI") or "", sys.version)


def cached_library() -> Path | None:
    """The verified library for this build key, or None (missing, or its hash does not match its record)."""
    return cached_artifact(build_key(), f"{MODULE}.so")


def build_library() -> Path:
    """Compile the kernels with torch's extension builder into the cache and return the library's path."""
    from torch.utils.cpp_extension import load

    def build(work: Path) -> Path:
        load(MODULE, [str(CSRC / name) for name in SOURCES], extra_cflags=[*CFLAGS, *isa_flags()],
             extra_ldflags=list(LDFLAGS), build_directory=str(work), verbose=False)
        return work / f"{MODULE}.so"

    print(f"compiling CPU kernels (first use, about {BUILD_SECONDS} s)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    library = build_artifact(build_key(), f"{MODULE}.so", build)
    print(f"compiled CPU kernels in {time.perf_counter() - start:.0f} s -> {library.parent}", file=sys.stderr,
          flush=True)
    return library


def _import(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


@functools.cache
def load_cpu_kernels():
    """The compiled kernels module (``skinny_linear``, ``decode_step``), built on first use; None where this
    machine cannot build or run them (no AVX2, no compiler), in which case callers use their eager paths."""
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        return _import(cached_library() or build_library())
    except Exception as error:  # no compiler, no ninja, a failed build: fall back to the eager paths
        log.warning("CPU decoding kernels unavailable (%s); using the eager paths", error)
        print(f"CPU kernels unavailable ({type(error).__name__}); decoding without them", file=sys.stderr)
        return None


__all__ = ["build_key", "build_library", "cache_root", "cached_library", "load_cpu_kernels", "prepare_cache_root"]
