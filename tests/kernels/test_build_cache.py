"""The kernel cache loads only a library whose hash matches its record, and builds in private folders."""

import os
import stat

import pytest

from lmstack.kernels import build


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMSTACK_KERNEL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _plant(cache, content: bytes, record: str):
    folder = cache / build.build_key()
    folder.mkdir(parents=True)
    (folder / f"{build.MODULE}.so").write_bytes(content)
    (folder / f"{build.MODULE}.so.sha256").write_text(record)
    return folder / f"{build.MODULE}.so"


def test_a_planted_library_is_never_loaded(cache):
    _plant(cache, b"\x7fELF planted code", "0" * 64)
    assert build.cached_library() is None  # hash mismatch: the caller rebuilds instead of importing it


def test_a_library_matching_its_record_is_used(cache):
    import hashlib

    library = _plant(cache, b"built", hashlib.sha256(b"built").hexdigest())
    assert build.cached_library() == library


def test_missing_record_means_rebuild(cache):
    library = _plant(cache, b"built", "x")
    (library.parent / f"{build.MODULE}.so.sha256").unlink()
    assert build.cached_library() is None


def test_cache_root_is_private(cache):
    build.prepare_cache_root()
    assert stat.S_IMODE(os.stat(cache).st_mode) == 0o700


def test_the_key_covers_sources_and_toolchain():
    key = build.build_key()
    assert len(key) == 20 and key == build.build_key()
