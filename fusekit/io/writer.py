"""Writing a merged model: streamed shards, and an output folder that appears only when complete.

:class:`ShardWriter` lays out every shard from the planned tensor specs, writes the headers first and
then each tensor's bytes at its offset as it arrives, in any order. :func:`atomic_output` gives the
caller a temporary folder beside the destination and renames it into place only on success; on any
error, Ctrl-C or SIGTERM the temporary folder is removed and the destination is left untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fusekit.errors import OutputExistsError, OutputWriteError
from fusekit.io.layout import (
    INDEX_FILE,
    TensorSpec,
    encode_header,
    plan_shards,
    shard_file_names,
    shard_index,
    tensor_bytes,
)

PARTIAL_MARKER = ".fusekit-partial-"


def write_error(path: Path, exc: OSError) -> OutputWriteError:
    """A one-line, actionable error for an OS failure while writing ``path``."""
    if exc.errno == errno.ENOSPC:
        why = "the disk is full; free space or choose another output folder"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied; choose a folder you can write to"
    else:
        why = exc.strerror or str(exc)
    return OutputWriteError(f"cannot write {path}: {why}")


class ShardWriter:
    """Streams planned tensors into safetensors shards under ``folder``."""

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], *, max_shard_bytes: int | None,
                 metadata: Mapping[str, str] | None = None,
                 index_metadata: Mapping[str, object] | None = None) -> None:
        self.folder = folder
        self._shards = plan_shards(specs, max_shard_bytes)
        self.file_names = shard_file_names(len(self._shards))
        self._specs = {spec.name: spec for spec in specs}
        self._where: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        self._remaining = {spec.name: spec.nbytes for spec in specs}
        self._lock = threading.Lock()
        self._index_metadata = dict(index_metadata or {})
        for number, (name, shard) in enumerate(zip(self.file_names, self._shards, strict=True)):
            header, offsets = encode_header(shard, metadata)
            path = folder / name
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                os.write(fd, header)
            except OSError as exc:
                self.close()
                raise write_error(path, exc) from None
            self._where.update({n: (number, off) for n, off in offsets.items()})

    def write(self, name: str, tensor: torch.Tensor, *, first_row: int = 0) -> None:
        """Write a planned tensor, or the block of its rows starting at ``first_row``.

        The tensor must be on the CPU with the planned dtype and trailing dimensions; blocks may
        arrive in any order and from any thread.
        """
        spec = self._specs[name]
        rows_ok = (tensor.dim() == len(spec.shape) and tuple(tensor.shape[1:]) == spec.shape[1:]
                   and (tensor.dim() == 0 or first_row + tensor.shape[0] <= spec.shape[0]))
        if not rows_ok or tensor.dtype != spec.dtype:
            raise RuntimeError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype} at row "
                               f"{first_row}, planned {spec.shape} {spec.dtype}")
        number, offset = self._where[name]
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        data = tensor_bytes(tensor.contiguous())
        start, done = offset + first_row * row_bytes, 0
        try:
            while done < len(data):
                done += os.pwrite(self._fds[number], data[done:], start + done)
        except OSError as exc:
            raise write_error(self.folder / self.file_names[number], exc) from None
        with self._lock:
            self._remaining[name] -= len(data)

    def finish(self) -> list[Path]:
        """Check every tensor was written, flush, write the index; return the shard paths."""
        missing = sorted(name for name, left in self._remaining.items() if left)
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were not fully written, "
                               f"e.g. {missing[0]}")
        try:
            for fd in self._fds:
                os.fsync(fd)
        except OSError as exc:
            raise write_error(self.folder, exc) from None
        self.close()
        if len(self._shards) > 1:
            index = shard_index(self._shards, self.file_names, self._index_metadata)
            write_json(self.folder / INDEX_FILE, index)
        return [self.folder / name for name in self.file_names]

    def close(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds = []


def write_json(path: Path, payload: Any) -> None:
    """Write pretty JSON, mapping OS failures to one-line errors."""
    write_text(path, json.dumps(payload, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise write_error(path, exc) from None


def check_output_folder(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an existing non-empty output unless ``overwrite``; refuse a file in its place."""
    if out_dir.is_file():
        raise OutputExistsError(f"output '{out_dir}' is a file; choose a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder '{out_dir}' already exists and is not empty; "
                                "choose another folder or pass --overwrite")


@contextlib.contextmanager
def atomic_output(out_dir: Path, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``out_dir`` when the block succeeds."""
    out_dir = Path(out_dir).absolute()
    check_output_folder(out_dir, overwrite=overwrite)
    tag = f"{PARTIAL_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp = out_dir.parent / f".{out_dir.name}{tag}"
    try:
        temp.mkdir(parents=True)
    except OSError as exc:
        raise write_error(temp, exc) from None
    try:
        yield temp
        _replace(temp, out_dir)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def _replace(temp: Path, out_dir: Path) -> None:
    """Move ``temp`` to ``out_dir``; an old output is swapped out first and then deleted."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}{PARTIAL_MARKER}old-{uuid.uuid4().hex[:8]}"
        os.rename(out_dir, old)
    try:
        os.rename(temp, out_dir)
    except OSError as exc:
        if old is not None:
            os.rename(old, out_dir)
        raise write_error(out_dir, exc) from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
