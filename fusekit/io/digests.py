"""A cache of input files' sha256 digests, keyed by what ``stat`` says about each file.

Hashing every input on every run would make an up-to-date check of a 70B merge cost minutes. Like
git's index, fusekit remembers each file's digest together with its device, inode, size and
modification time (ns), and hashes again only when one of them changed. The cache is a JSON file in
``$FUSEKIT_CACHE`` (default ``$XDG_CACHE_HOME/fusekit`` or ``~/.cache/fusekit``);
``FUSEKIT_HASH_CACHE=0`` turns it off, so that every run hashes every byte.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
from pathlib import Path

from fusekit.cache import cache_folder
from fusekit.io.writer import file_sha256

CACHE_NAME = "sha256-v1.json"
MAX_ENTRIES = 10_000
log = logging.getLogger("fusekit")


def _stamp(path: Path) -> list[int]:
    info = path.stat()
    return [info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns]


class DigestCache:
    """Thread-safe ``digest(path)``; :meth:`save` writes what was learned (atomically)."""

    def __init__(self, folder: Path | None = None) -> None:
        self.enabled = os.environ.get("FUSEKIT_HASH_CACHE") != "0"
        self.file = (folder or cache_folder()) / CACHE_NAME
        self._entries: dict[str, list[object]] = self._load() if self.enabled else {}
        self._changed = False
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[object]]:
        try:
            data = json.loads(self.file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def digest(self, path: Path) -> str:
        """``path``'s sha256, from the cache when its stat stamp is unchanged."""
        key = str(path.resolve())
        stamp = _stamp(path)
        with self._lock:
            known = self._entries.get(key)
        if known is not None and known[:4] == stamp and isinstance(known[4], str):
            return known[4]
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
