"""Build-once cache of lmstack's C++ CPU kernels (``csrc/``), safe against killed builds and planted files.

The compiled library lives in ``$LMSTACK_KERNEL_CACHE`` (default ``~/.cache/lmstack/kernels``), in a folder
named by a hash of everything that shapes it: the sources and headers, the compiler's version, the
flags, torch's version and the Python ABI. Loading it is a plain extension-module import (milliseconds,
no compiler). A build runs only when a caller needs the kernels and that folder holds no verified
library: it says so on stderr, compiles in a private temporary folder, records the SHA-256 of the built
file beside it and renames the result into place, so a killed build leaves no lock and no partial file.
A library whose hash does not match its record (a file planted or damaged in the cache) is never
loaded: it is rebuilt. The cache folders are created mode 0700.
"""

import functools
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)
CSRC = Path(__file__).with_name("csrc")
SOURCES = ("extension.cpp", "skinny_linear.cpp", "decode_step.cpp")
MODULE = "lmstack_cpu_kernels"
CFLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp")
LDFLAGS = ("-fopenmp",)
BUILD_SECONDS = 120  # what a first build takes on the 2-core reference machine


def cache_root() -> Path:
    return Path(os.environ.get("LMSTACK_KERNEL_CACHE") or Path.home() / ".cache" / "lmstack" / "kernels")


@functools.cache
def build_key() -> str:
    """Hash of the sources, compiler, flags, torch version and Python ABI."""
    import torch

    digest = hashlib.sha256()
    for file in sorted(CSRC.iterdir()):
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    compiler = os.environ.get("CXX", "c++")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = "no compiler"
    for part in (version, " ".join(CFLAGS + LDFLAGS), torch.__version__, sysconfig.get_config_var("SOABI") or "",
                 sys.version):
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _import(path: Path):
    loader = importlib.machinery.ExtensionFileLoader(MODULE, str(path))
    spec = importlib.util.spec_from_file_location(MODULE, path, loader=loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def cached_library() -> Path | None:
    """The verified library for this build key, or None (missing, or its hash does not match its record)."""
    folder = cache_root() / build_key()
    library, record = folder / f"{MODULE}.so", folder / f"{MODULE}.so.sha256"
    if not (library.is_file() and record.is_file()):
        return None
    if _file_hash(library) != record.read_text().strip():
        log.warning("kernel cache %s: library does not match its recorded hash; rebuilding", folder)
        return None
    return library


def build_library() -> Path:
    """Compile the kernels into the cache (see the module docstring) and return the library's path."""
    from torch.utils.cpp_extension import load

    root = cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    print(f"compiling CPU kernels (first use, about {BUILD_SECONDS} s)...", file=sys.stderr, flush=True)
    start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))  # private: no other build shares its lock
    try:
        load(MODULE, [str(CSRC / name) for name in SOURCES], extra_cflags=list(CFLAGS),
             extra_ldflags=list(LDFLAGS), build_directory=str(work), verbose=False)
        built = work / f"{MODULE}.so"
        staging = Path(tempfile.mkdtemp(prefix=".ready-", dir=root))
        shutil.copy2(built, staging / built.name)
        (staging / f"{built.name}.sha256").write_text(_file_hash(staging / built.name))
        final = root / build_key()
        if final.exists():
            shutil.rmtree(final)  # an unverified or damaged earlier copy
        os.replace(staging, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"compiled CPU kernels in {time.perf_counter() - start:.0f} s -> {final}", file=sys.stderr, flush=True)
    return final / f"{MODULE}.so"


@functools.cache
def load_cpu_kernels():
    """The compiled kernels module (``skinny_linear``, ``decode_step``), built on first use; None where this
    machine cannot build or run them (no AVX2, no compiler), in which case callers use their eager paths."""
    import torch

    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    try:
        library = cached_library() or build_library()
        return _import(library)
    except Exception as error:  # no compiler, no ninja, a failed build: fall back to the eager paths
        log.warning("CPU decoding kernels unavailable (%s); using the eager paths", error)
        print(f"CPU kernels unavailable ({type(error).__name__}); decoding without them", file=sys.stderr)
        return None
