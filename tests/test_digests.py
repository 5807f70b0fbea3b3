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


def test_an_edit_with_size_and_mtime_restored_is_noticed(tmp_path: Path) -> None:
    """The stamp holds the ctime, which no user process can set back."""
    data = tmp_path / "w.safetensors"
    data.write_bytes(b"a" * 1000)
    cache = DigestCache(tmp_path / "cache")
    assert cache.digest(data) == _sha(b"a" * 1000)
    cache.save()
    info = data.stat()
    os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns + 10**9))  # only the ctime moves on...
    os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns))
    with data.open("r+b") as handle:  # ...then an edit in place, size and mtime put back
        handle.write(b"b")
    os.utime(data, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (data.stat().st_size, data.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns)
    assert DigestCache(tmp_path / "cache").digest(data) == _sha(b"b" + b"a" * 999)


def test_rehash_never_trusts_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "w.safetensors"
    data.write_bytes(b"abc")
    cache = DigestCache(tmp_path / "cache")
    cache.digest(data)
    cache.save()
    calls: list[Path] = []
    monkeypatch.setattr(digests, "file_sha256", lambda path: calls.append(path) or "f" * 64)
    assert DigestCache(tmp_path / "cache").digest(data) == _sha(b"abc") and calls == []
    assert DigestCache(tmp_path / "cache", rehash=True).digest(data) == "f" * 64 and calls == [data]


@pytest.mark.parametrize("content", [
    '{"K": [1, 2, 3, 4, "abc"]}',  # the old 5-field shape
    '{"K": [1, 2, 3, 4, 5, 6]}',  # a digest that is not a string
    '{"K": ["1", 2, 3, 4, 5, "%s"]}' % ("0" * 64),  # a stamp field that is not an int
    '{"K": 7}', '{"K": null}', '[1, 2]', '"text"', '{"K": [1, 2, 3, 4, 5, "short"]}',
])
def test_malformed_entries_are_ignored_and_rewritten(content: str, tmp_path: Path) -> None:
    data = tmp_path / "w.safetensors"
    data.write_bytes(b"q" * 10)
    info = data.stat()
    stamp = [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]
    (tmp_path / "cache").mkdir()
    cache_file = tmp_path / "cache" / CACHE_NAME
    # aim a well-formed-looking entry at the real file, so that a lax loader would use it
    cache_file.write_text(content.replace('"K"', json.dumps(str(data.resolve())))
                          .replace("[1, 2, 3, 4, 5,", json.dumps(stamp)[:-1] + ","))
    cache = DigestCache(tmp_path / "cache")
    assert cache.digest(data) == _sha(b"q" * 10)
    cache.save()
    saved = json.loads(cache_file.read_text())
    assert saved == {str(data.resolve()): [*stamp, _sha(b"q" * 10)]}
