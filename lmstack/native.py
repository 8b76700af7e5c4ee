"""Build-once cache for lmstack's compiled code (torch-free, shared by ``kernels`` and ``tokenizers``).

Each artifact lives in ``$LMSTACK_KERNEL_CACHE`` (default ``~/.cache/lmstack/kernels``) in a folder named
by a hash of everything that shapes it (sources, compiler version, flags, ...). A build writes into a
private temporary folder, records the SHA-256 of the built file beside it and renames the folder into
place, so a killed build leaves no lock and no partial file, and a file planted or damaged in the cache
(whose hash no longer matches its record) is never loaded: it is rebuilt. Folders are mode 0700.
"""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Iterable


def cache_root() -> Path:
    return Path(os.environ.get("LMSTACK_KERNEL_CACHE") or Path.home() / ".cache" / "lmstack" / "kernels")


def prepare_cache_root() -> Path:
    """The cache root, created if needed, readable by its owner only (mode 0700)."""
    root = cache_root()
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    return root


@functools.cache
def compiler_version(compiler: str | None = None) -> str:
    compiler = compiler or os.environ.get("CXX", "c++")
    try:
        return subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return "no compiler"


def content_key(files: Iterable[Path], *parts: str) -> str:
    """A 20-hex-digit hash of the files' names and bytes and of ``parts``."""
    digest = hashlib.sha256()
    for file in files:
        digest.update(file.name.encode() + b"\0" + file.read_bytes())
    for part in parts:
        digest.update(part.encode() + b"\0")
    return digest.hexdigest()[:20]


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def cached_artifact(key: str, filename: str) -> Path | None:
    """The artifact ``filename`` of ``key`` if present and matching its recorded hash, else None."""
    folder = cache_root() / key
    artifact, record = folder / filename, folder / f"{filename}.sha256"
    if not (artifact.is_file() and record.is_file()):
        return None
    if _file_hash(artifact) != record.read_text().strip():
        print(f"lmstack: {artifact} does not match its recorded hash; rebuilding it", file=sys.stderr)
        return None
    return artifact


def build_artifact(key: str, filename: str, build: Callable[[Path], Path]) -> Path:
    """Run ``build(private_folder) -> built file`` and install the result as ``key``/``filename``."""
    root = prepare_cache_root()
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=root))  # private: no other build shares it
    try:
        built = build(work)
        staging = Path(tempfile.mkdtemp(prefix=".ready-", dir=root))
        shutil.copy2(built, staging / filename)
        (staging / f"{filename}.sha256").write_text(_file_hash(staging / filename))
        final = root / key
        if cached_artifact(key, filename) is not None:  # another process finished the same build first
            shutil.rmtree(staging, ignore_errors=True)
            return final / filename
        if final.exists():
            shutil.rmtree(final)  # an unverified or damaged earlier copy
        os.replace(staging, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final / filename


def shared_library(name: str, sources: list[Path], flags: tuple[str, ...] = ("-O3", "-std=c++17"),
                   headers: list[Path] = ()) -> Path:
    """A plain C/C++ shared library (no Python or torch headers; load it with ctypes), built once.
    ``headers``: the files the sources include, so that editing one rebuilds the library.

    Raises:
        OSError / subprocess.CalledProcessError: no compiler, or the build failed.
    """
    compiler = os.environ.get("CXX", "c++")
    key = content_key([*sources, *headers], compiler_version(compiler), " ".join(flags), sys.platform)
    filename = f"{name}.so"
    found = cached_artifact(key, filename)
    if found is not None:
        return found

    def build(work: Path) -> Path:
        out = work / filename
        subprocess.run([compiler, *flags, "-shared", "-fPIC", *map(str, sources), "-o", str(out)], check=True,
                       capture_output=True, timeout=300)
        return out

    return build_artifact(key, filename, build)
