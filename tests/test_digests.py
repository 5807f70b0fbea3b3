"""The stat-keyed digest cache: right digests, reused while a file is unchanged, redone after."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from fusekit.io import digests
from fusekit.io.digests import CACHE_NAME, DigestCache


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_digests_are_cached_until_the_file_changes(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "w.safetensors"
    data.write_bytes(b"a" * 1000)
    cache = DigestCache(tmp_path / "cache")
    assert cache.digest(data) == _sha(b"a" * 1000)
    cache.save()
    assert json.loads((tmp_path / "cache" / CACHE_NAME).read_text())

    def refuse(path: Path) -> str:
        raise AssertionError("hashed again although unchanged")

    monkeypatch.setattr(digests, "file_sha256", refuse)
    assert DigestCache(tmp_path / "cache").digest(data) == _sha(b"a" * 1000)
    monkeypatch.undo()
    data.write_bytes(b"b" * 1000)  # same size: the modification time tells
    os.utime(data, ns=(1, 2))
    assert DigestCache(tmp_path / "cache").digest(data) == _sha(b"b" * 1000)


def test_the_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEKIT_HASH_CACHE", "0")
    data = tmp_path / "w.safetensors"
    data.write_bytes(b"xyz")
    cache = DigestCache(tmp_path / "cache")
    assert cache.digest(data) == _sha(b"xyz")
    cache.save()
    assert not (tmp_path / "cache").exists()


def test_a_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / CACHE_NAME).write_text("{not json")
    data = tmp_path / "w.safetensors"
    data.write_bytes(b"q")
    assert DigestCache(tmp_path / "cache").digest(data) == _sha(b"q")
