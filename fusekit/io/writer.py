"""Writing a merged model: streamed shards, and an output folder that appears only when complete.

:class:`ShardWriter` lays out every shard from the planned tensor specs, writes the headers first and
then each tensor's bytes at its offset as it arrives, in any order. :func:`atomic_output` gives the
caller a temporary folder beside the destination and renames it into place only on success; on any
error, Ctrl-C or SIGTERM the temporary folder is removed and the destination is left untouched.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from fusekit.errors import (
    NonFiniteError,
    OutputExistsError,
    OutputPathError,
    OutputWriteError,
    note_kept_partial,
)
from fusekit.io.files import PARTIAL_MARKER, file_sha256, write_error, write_json
from fusekit.io.layout import (
    INDEX_FILE,
    TensorSpec,
    encode_header,
    plan_shards,
    shard_file_names,
    shard_index,
    tensor_bytes,
)

log = logging.getLogger("fusekit")
ShardDone = Callable[[str, str, int], None]  # (file name, sha256, size) once a shard is complete


class ShardWriter:
    """Streams planned tensors into safetensors shards under ``folder``.

    Every shard is hashed (sha256) as its bytes are written, in order, so the digests of the output
    cost no second read. Once all of a shard's bytes are written ``on_shard_done`` is told its
    name, digest and size (the resume journal records them).

    Args:
        folder: where the shards go (the temporary output folder).
        specs: every output tensor in write order; shards are cut from them by ``max_shard_bytes``.
        keep: shard file name → sha256 of shards already complete in ``folder`` (verified by the
            caller, e.g. when resuming); they are left as they are and their tensors count as written.
        check_finite: refuse a floating-point tensor holding NaN or infinity
            (:class:`~fusekit.errors.NonFiniteError` naming it).
    """

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], *, max_shard_bytes: int | None,
                 metadata: Mapping[str, str] | None = None,
                 index_metadata: Mapping[str, object] | None = None,
                 keep: Mapping[str, str] | None = None, on_shard_done: ShardDone | None = None,
                 check_finite: bool = False) -> None:
        self.folder = folder
        self._shards = plan_shards(specs, max_shard_bytes)
        self.file_names = shard_file_names(len(self._shards))
        self._specs = {spec.name: spec for spec in specs}
        self._where: dict[str, tuple[int, int]] = {}
        self._fds: list[int] = []
        self._remaining = {spec.name: spec.nbytes for spec in specs}
        self._lock = threading.Lock()
        self._index_metadata = dict(index_metadata or {})
        self._on_shard_done = on_shard_done
        self.check_finite = check_finite
        # Seconds to sleep per write; only tests set it, to interrupt a merge part way through.
        self._test_delay = float(os.environ.get("FUSEKIT_TEST_WRITE_DELAY", "0") or 0)
        keep = dict(keep or {})
        self.hashes: dict[str, str] = {}
        self.sizes: dict[str, int] = {}
        self._left: list[int] = []  # bytes still to write, per shard
        self._hashers: list[Any] = []
        self._hashed_to: list[int] = []  # next offset the running hash expects; -1: re-read at the end
        for number, (name, shard) in enumerate(zip(self.file_names, self._shards, strict=True)):
            header, offsets = encode_header(shard, metadata)
            path = folder / name
            self._where.update({n: (number, off) for n, off in offsets.items()})
            size = len(header) + sum(spec.nbytes for spec in shard)
            self.sizes[name] = size
            self._hashers.append(hashlib.sha256(header))
            self._hashed_to.append(len(header))
            if name in keep:
                self._fds.append(-1)
                self._left.append(0)
                self.hashes[name] = keep[name]
                for spec in shard:
                    self._remaining[spec.name] = 0
                continue
            self._left.append(size - len(header))
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                self._fds.append(fd)
                _write_all(fd, memoryview(header), 0)
                os.ftruncate(fd, size)
            except OSError as exc:
                self.close()
                raise write_error(path, exc) from None
        for number, left in enumerate(self._left):  # shards of nothing but empty tensors
            if left == 0 and self.file_names[number] not in self.hashes:
                self._complete(number)

    @property
    def kept(self) -> frozenset[str]:
        """Names of the tensors that already sit in kept shards."""
        return frozenset(name for name, left in self._remaining.items()
                         if left == 0 and self._specs[name].nbytes)

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
        if self.check_finite and tensor.is_floating_point() and not is_finite(tensor):
            raise NonFiniteError(f"tensor '{name}': the merged values hold NaN or infinity; check the "
                                 "inputs and parameters, or pass --allow-nonfinite to write them anyway",
                                 name)
        if self._test_delay:
            time.sleep(self._test_delay)
        number, offset = self._where[name]
        row_bytes = spec.nbytes // spec.shape[0] if spec.shape and spec.shape[0] else 0
        data = tensor_bytes(tensor.contiguous())
        start = offset + first_row * row_bytes
        with self._lock:
            if self._hashed_to[number] == start:
                self._hashers[number].update(data)
                self._hashed_to[number] += len(data)
            else:
                self._hashed_to[number] = -1
        try:
            _write_all(self._fds[number], data, start)
        except OSError as exc:
            raise write_error(self.folder / self.file_names[number], exc) from None
        with self._lock:
            self._remaining[name] -= len(data)
            self._left[number] -= len(data)
            done = self._left[number] == 0 and len(data) > 0
        if done:
            self._complete(number)

    def _complete(self, number: int) -> None:
        """A shard's bytes are all written: finish its digest and report it. No fsync: a resume
        re-hashes every journaled shard, so one lost in a power cut is recomputed, and flushing
        each shard to disk cost a linear merge a sixth of its time."""
        name = self.file_names[number]
        path = self.folder / name
        try:
            digest = (self._hashers[number].hexdigest() if self._hashed_to[number] == self.sizes[name]
                      else file_sha256(path))
        except OSError as exc:
            raise write_error(path, exc) from None
        self.hashes[name] = digest
        if self._on_shard_done is not None:
            self._on_shard_done(name, digest, self.sizes[name])

    def finish(self) -> list[Path]:
        """Check every tensor was written, flush, write the index; return the shard paths."""
        missing = sorted(name for name, left in self._remaining.items() if left)
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were not fully written, "
                               f"e.g. {missing[0]}")
        self.close()
        if len(self._shards) > 1:
            index = shard_index(self._shards, self.file_names, self._index_metadata)
            write_json(self.folder / INDEX_FILE, index)
        return [self.folder / name for name in self.file_names]

    def close(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._fds = []


def _write_all(fd: int, data: memoryview, start: int) -> None:
    done = 0
    while done < len(data):
        done += os.pwrite(fd, data[done:], start + done)


def is_finite(tensor: torch.Tensor) -> bool:
    """True when no element is NaN or ±inf.

    A sum is NaN or infinite whenever an element is, and costs one pass without a temporary; only a
    non-finite sum (which large finite values can also give) pays for the exact elementwise test.
    """
    if tensor.numel() == 0:
        return True
    accumulate = torch.float32 if tensor.dtype in (torch.float16, torch.bfloat16) else None
    if bool(torch.isfinite(tensor.sum(dtype=accumulate))):
        return True
    return bool(torch.isfinite(tensor).all())


MAX_OUTPUT_NAME = 200  # bytes; the partial folder and lock file beside it add up to 40 to the name


def _check_usable(resolved: Path, text: str, what: str) -> None:
    """Refuse a path the file system cannot hold (a name too long, a folder that cannot be searched)
    before anything is written, rather than with an OSError mid-run."""
    shown = text if len(text) <= 80 else text[:80] + "..."
    if len(os.fsencode(resolved.name)) > MAX_OUTPUT_NAME:
        raise OutputPathError(f"{what} '{shown}': its name is longer than {MAX_OUTPUT_NAME} bytes (fusekit "
                              "adds a suffix for its temporary folder); choose a shorter name")
    try:
        os.lstat(resolved)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputPathError(f"{what} '{shown}': the path cannot be used ({exc.strerror or exc}); "
                              "choose another") from None


def check_output_location(out: str | Path, *, what: str = "output folder") -> Path:
    """Refuse an output path that no command may replace; return it resolved (symlinks followed).

    Refused, whatever the options: ``~`` written literally (the shell did not expand it), the
    current folder (``.``, and ``''``, which means it) or any folder holding it, the home folder or
    any folder holding it, and a file system root.

    Raises:
        OutputPathError: one line naming the path and what to write instead.
    """
    text = os.fspath(out)
    if text == "~" or text.startswith("~/"):
        raise OutputPathError(f"{what} '{text}': '~' was not expanded to your home folder; write the "
                              "full path of a new folder instead")
    resolved = Path(os.path.abspath(text)).resolve()
    _check_usable(resolved, text, what)
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    why = None
    if resolved.parent == resolved:
        why = "is the root of the file system"
    elif resolved == cwd or resolved in cwd.parents:
        why = "is the current folder" if resolved == cwd else "holds the current folder"
    elif resolved == home or resolved in home.parents:
        why = "is your home folder" if resolved == home else "holds your home folder"
    if why is not None:
        shown = text or "''"
        raise OutputPathError(f"{what} '{shown}' {why}, which fusekit never replaces; name a new "
                              "folder for the output, e.g. ./merged")
    return resolved


def check_output_folder(out_dir: Path, *, overwrite: bool) -> None:
    """Refuse an existing non-empty output unless ``overwrite``; refuse a file in its place, and the
    paths :func:`check_output_location` refuses."""
    check_output_location(out_dir)
    if out_dir.is_file():
        raise OutputExistsError(f"output '{out_dir}' is a file; choose a folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise OutputExistsError(f"output folder '{out_dir}' already exists and is not empty; "
                                "choose another folder or pass --overwrite")


@contextlib.contextmanager
def atomic_output(out_dir: Path, *, overwrite: bool = False, reuse: Path | None = None,
                  keep_partial: bool = False,
                  before_rename: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``out_dir`` when the block succeeds.

    Args:
        reuse: a partial folder of an earlier, interrupted run to continue in (it is renamed to this
            run's temporary name first, so a concurrent resume cannot take it too).
        keep_partial: on an interruption or a failed write (disk full), keep the temporary folder so
            that ``--resume`` can continue it; it stays hidden and never looks complete. Any other
            error removes it.
        before_rename: called with the temporary folder once the block succeeded, just before it
            becomes ``out_dir`` (used to drop the resume journal).
    """
    out_dir = Path(out_dir).absolute()
    check_output_folder(out_dir, overwrite=overwrite)
    tag = f"{PARTIAL_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    temp = out_dir.parent / f".{out_dir.name}{tag}"
    try:
        if reuse is not None:
            os.rename(reuse, temp)
        else:
            temp.mkdir(parents=True)
    except OSError as exc:
        raise write_error(temp, exc) from None
    try:
        yield temp
        if before_rename is not None:
            before_rename(temp)
        _replace(temp, out_dir)
    except (KeyboardInterrupt, OutputWriteError, OSError) as exc:
        if not keep_partial:
            shutil.rmtree(temp, ignore_errors=True)
        elif isinstance(exc, (OutputWriteError, OSError)):
            log.warning("the partial output is kept in %s; run again with --resume once the "
                        "problem is fixed", temp)
        else:
            note_kept_partial(exc, temp)  # the CLI names it instead of "no output was left behind"
        raise
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise


def partial_folders(out_dir: Path) -> list[Path]:
    """Partial folders that runs for ``out_dir`` left behind (newest first)."""
    out_dir = Path(out_dir).absolute()
    prefix = f".{out_dir.name}{PARTIAL_MARKER}"
    if not out_dir.parent.is_dir():
        return []
    found = [p for p in out_dir.parent.iterdir()
             if p.name.startswith(prefix) and not p.name[len(prefix):].startswith("old-") and p.is_dir()]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)


def partial_owner(folder: Path) -> int | None:
    """The process id in a partial folder's name, when that process is still running."""
    pid_text = folder.name.rsplit(PARTIAL_MARKER, 1)[-1].split("-", 1)[0]
    if not pid_text.isdigit():
        return None
    pid = int(pid_text)
    if pid == os.getpid():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    return pid


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
