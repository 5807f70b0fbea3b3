"""Resuming an interrupted merge from the shards it completed.

A merge writes into a hidden partial folder (see :func:`fusekit.io.writer.atomic_output`). Beside the
shards it keeps ``fusekit.journal``: a first line naming the run (a key over the recipe, the input
files' names and sizes, the output layout and the library versions, plus the seed), a line with a
digest of the inputs' sha256s once they are hashed, and one line per completed shard with its
sha256, appended once the shard is written.

``fusekit merge --resume`` looks for such a folder left by a run that is no longer alive, checks that
its key matches the current run and that its inputs digest matches the inputs hashed again now, byte
by byte (a file edited in place with its size and modification time restored is still noticed; a
journal without the inputs line is not trusted), re-hashes every journaled shard and keeps those
whose digest still matches; the executor then skips the tensors of kept shards. Shards are laid out
in plan order and hold the same bytes whatever the run, so the finished output is byte-identical to
an uninterrupted run. The journal is removed before the output is renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusekit.io.files import file_sha256, write_error
from fusekit.io.layout import TensorSpec, plan_shards, shard_file_names
from fusekit.io.writer import ShardWriter, partial_folders, partial_owner

JOURNAL_FILE = "fusekit.journal"
log = logging.getLogger("fusekit")


def run_key(parts: Mapping[str, Any]) -> str:
    """A digest of everything that decides the bytes of a run's shards."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def inputs_digest(inputs: Mapping[str, Any]) -> str:
    """One digest over the inputs' sizes and sha256s (:meth:`InputFingerprints.result`)."""
    return run_key({"inputs": inputs})


class Journal:
    """Appends completed shards to ``folder/fusekit.journal``; thread-safe.

    Args:
        folder: the partial output folder.
        key / seed: what the run is (written as the first line of a fresh journal).
        fresh: start a new journal (False: continue a resumed one).
        inputs: returns the inputs digest once the inputs are hashed (else None); it is asked at
            each completed shard until it answers, and the answer is journaled before the shard.
    """

    def __init__(self, folder: Path, *, key: str, seed: int, fresh: bool,
                 inputs: Callable[[], str | None] | None = None) -> None:
        self.path = folder / JOURNAL_FILE
        self._lock = threading.Lock()
        self._inputs = inputs
        if fresh:
            self._append({"key": key, "seed": seed})

    def record(self, name: str, sha256: str, size: int) -> None:
        if self._inputs is not None:
            digest = self._inputs()
            if digest is not None:
                self._inputs = None
                self._append({"inputs": digest})
        self._append({"shard": name, "sha256": sha256, "size": size})

    def _append(self, entry: Mapping[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True) + "\n").encode()
        with self._lock:
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                raise write_error(self.path, exc) from None

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def read_journal(folder: Path) -> tuple[dict[str, Any], dict[str, tuple[str, int]]] | None:
    """(header, shard name → (sha256, size)) of a partial folder, or None when it has no usable
    journal. A torn last line (the process died while appending) is ignored."""
    try:
        lines = (folder / JOURNAL_FILE).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None
    entries = []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            break
        if not isinstance(entry, dict):
            break
        entries.append(entry)
    header = dict(entries[0]) if entries else {}
    if not isinstance(header.get("key"), str) or not isinstance(header.get("seed"), int):
        return None
    shards = {}
    for entry in entries[1:]:
        if isinstance(entry.get("inputs"), str):
            header["inputs"] = entry["inputs"]
        name, digest, size = entry.get("shard"), entry.get("sha256"), entry.get("size")
        if isinstance(name, str) and Path(name).name == name and isinstance(digest, str) \
                and isinstance(size, int):
            shards[name] = (digest, size)
    return header, shards


@dataclass
class Resumable:
    """A partial folder to continue: its verified shards (name → sha256) and its seed."""

    folder: Path
    keep: dict[str, str]
    seed: int
    journaled: int = 0


def find_resumable(out_dir: Path, *, key: str, seed: int | None,
                   inputs: str | None = None) -> Resumable | None:
    """The newest partial folder of ``out_dir`` whose journal matches ``key`` (and ``seed`` when
    given, and the inputs digest ``inputs`` when given: see :func:`inputs_digest`), with its shards
    verified; partial folders of dead runs that do not match are removed."""
    chosen: Resumable | None = None
    for folder in partial_folders(out_dir):
        owner = partial_owner(folder)
        if owner is not None:
            log.warning("%s belongs to a fusekit run still in progress (pid %d); leaving it alone",
                        folder.name, owner)
            continue
        journal = read_journal(folder)
        matches = (journal is not None and chosen is None and journal[0]["key"] == key
                   and (seed is None or journal[0]["seed"] == seed))
        if matches and journal is not None and inputs is not None and journal[0].get("inputs") != inputs:
            matches = False
            log.warning("removing %s: the input files' content differs from what it was built from "
                        "(or was not yet recorded)", folder.name)
        elif not matches and chosen is None:
            log.warning("removing %s: it was left by an interrupted run of a different recipe, "
                        "inputs or options", folder.name)
        if not matches or journal is None:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        header, shards = journal
        keep = {}
        for name, (digest, size) in shards.items():
            path = folder / name
            try:
                if path.is_file() and path.stat().st_size == size and file_sha256(path) == digest:
                    keep[name] = digest
            except OSError:
                continue
        chosen = Resumable(folder, keep, header["seed"], journaled=len(shards))
    return chosen


@dataclass
class OutputGuard:
    """What the executor needs for resuming and checking: which tensors to skip, and the writer.

    Args:
        specs / max_shard_bytes: the output layout (as the executor lays it out).
        keep: shards already complete and verified (name → sha256); their tensors are skipped.
        journal: where completed shards are recorded.
        check_finite: refuse NaN/Inf in merged tensors.
    """

    specs: Sequence[TensorSpec]
    max_shard_bytes: int | None
    keep: Mapping[str, str] = field(default_factory=dict)
    journal: Journal | None = None
    check_finite: bool = True
    writer: ShardWriter | None = None

    def __post_init__(self) -> None:
        shards = plan_shards(self.specs, self.max_shard_bytes)
        names = shard_file_names(len(shards))
        self._skipped = frozenset(spec.name for name, shard in zip(names, shards, strict=True)
                                  if name in self.keep for spec in shard)

    def skip(self, tensor: str) -> bool:
        """True when ``tensor`` already sits in a kept shard."""
        return tensor in self._skipped

    def open_writer(self, folder: Path, specs: Sequence[TensorSpec], *, max_shard_bytes: int | None,
                    **options: Any) -> ShardWriter:
        """A :class:`ShardWriter` that keeps the verified shards, journals and checks."""
        self.writer = ShardWriter(folder, specs, max_shard_bytes=max_shard_bytes, keep=self.keep,
                                  on_shard_done=self.journal.record if self.journal else None,
                                  check_finite=self.check_finite, **options)
        return self.writer
