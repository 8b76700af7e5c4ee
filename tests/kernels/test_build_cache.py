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


def test_a_plain_library_is_built_once_into_a_fresh_cache_and_verified(cache):
    from pathlib import Path

    from lmstack.native import cached_artifact, shared_library

    source = Path(build.__file__).parents[1] / "tokenizers" / "csrc" / "bpe_merge.cpp"
    first = shared_library("lmstack_bpe_merge", [source])
    assert first.is_file() and first.parent.parent == cache
    assert (first.parent / f"{first.name}.sha256").is_file()
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]  # no build or staging folders left
    assert shared_library("lmstack_bpe_merge", [source]) == first  # from the cache this time
    first.write_bytes(first.read_bytes() + b"tampered")
    assert cached_artifact(first.parent.name, first.name) is None
    rebuilt = shared_library("lmstack_bpe_merge", [source])
    assert cached_artifact(rebuilt.parent.name, rebuilt.name) == rebuilt
