"""A cache of input files' sha256 digests, keyed by what ``stat`` says about each file.

Hashing every input on every run would make an up-to-date check of a 70B merge cost minutes. Like
git's index, fusekit remembers each file's digest together with its device, inode, size,
modification time and status-change time (ns), and hashes again only when one of them changed. The
ctime matters: an edit in place can restore a file's size and mtime (``touch -d``, ``os.utime``), but
no user process can set its ctime. The cache is a JSON file in ``$FUSEKIT_CACHE`` (default
``$XDG_CACHE_HOME/fusekit`` or ``~/.cache/fusekit``); entries of the wrong shape (a corrupt or old
cache) are dropped and the file rewritten. ``FUSEKIT_HASH_CACHE=0`` turns it off, so that every run
hashes every byte; ``DigestCache(rehash=True)`` (``--locked``) hashes every byte and refreshes it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path

from fusekit.cache import cache_folder
from fusekit.io.files import file_sha256

CACHE_NAME = "sha256-v1.json"  # entries of the older 5-field shape are dropped on load
MAX_ENTRIES = 10_000
log = logging.getLogger("fusekit")


STAMP_FIELDS = 5  # dev, ino, size, mtime_ns, ctime_ns; then the digest


def _stamp(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns]


def _valid(entry: object) -> bool:
    """An entry is ``[dev, ino, size, mtime_ns, ctime_ns, sha256 hex]``; anything else is dropped."""
    return (isinstance(entry, list) and len(entry) == STAMP_FIELDS + 1
            and all(type(v) is int for v in entry[:STAMP_FIELDS])
            and isinstance(entry[STAMP_FIELDS], str) and len(entry[STAMP_FIELDS]) == 64)


class DigestCache:
    """Thread-safe ``digest(path)``; :meth:`save` writes what was learned (atomically).

    Args:
        folder: where the cache file lives (default: :func:`fusekit.cache.cache_folder`).
        rehash: never trust a cached digest (every byte is read); what is hashed is still saved.
    """

    def __init__(self, folder: Path | None = None, *, rehash: bool = False) -> None:
        self.enabled = os.environ.get("FUSEKIT_HASH_CACHE") != "0"
        self.rehash = rehash
        self.file = (folder or cache_folder()) / CACHE_NAME
        self._changed = False
        self._entries: dict[str, list[object]] = self._load() if self.enabled else {}
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[object]]:
        """The saved entries; a corrupt file or malformed entries are dropped (and rewritten)."""
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            data = None
        if not isinstance(data, dict):
            self._changed = self.file.exists()
            return {}
        entries = {k: v for k, v in data.items() if isinstance(k, str) and _valid(v)}
        self._changed = len(entries) != len(data)
        return entries

    def digest(self, path: Path) -> str:
        """``path``'s sha256, from the cache when its stat stamp is unchanged (and not ``rehash``)."""
        key = str(path.resolve())
        stamp = _stamp(path)
        with self._lock:
            known = self._entries.get(key)
        if not self.rehash and known is not None and known[:STAMP_FIELDS] == stamp:
            return str(known[STAMP_FIELDS])
        digest = file_sha256(path)
        if self.enabled and _stamp(path) == stamp:  # unchanged while it was read
            with self._lock:
                self._entries[key] = [*stamp, digest]
                self._changed = True
        return digest

    def save(self) -> None:
        """Write the cache; a failure only costs the next run its hashing, so it is logged."""
        with self._lock:
            if not (self.enabled and self._changed):
                return
            entries = dict(list(self._entries.items())[-MAX_ENTRIES:])
            self._changed = False
        temp = self.file.with_name(f".{self.file.name}.{uuid.uuid4().hex[:8]}")
        try:
            self.file.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps(entries), encoding="utf-8")
            os.replace(temp, self.file)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            log.info("could not save the digest cache %s (%s)", self.file, exc)
