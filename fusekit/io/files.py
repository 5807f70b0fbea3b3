"""Small file helpers that need no torch: digests, one-line write errors, JSON and text writes.

Kept apart from :mod:`fusekit.io.writer` (which streams tensors) so that commands that only look
at files, such as ``fusekit push``, start without importing torch.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from fusekit.errors import CheckpointError, OutputWriteError

PARTIAL_MARKER = ".fusekit-partial-"  # in the name of every folder or file still being written
HASH_BLOCK = 2**20


def write_error(path: Path, exc: OSError) -> OutputWriteError:
    """A one-line, actionable error for an OS failure while writing ``path``."""
    if exc.errno == errno.ENOSPC:
        why = "the disk is full; free space or choose another output folder"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        why = "permission denied; choose a folder you can write to"
    else:
        why = exc.strerror or str(exc)
    return OutputWriteError(f"cannot write {path}: {why}")


def file_sha256(path: Path) -> str:
    """The sha256 hex digest of a file, read in blocks."""
    digest = hashlib.sha256()
    buffer = bytearray(HASH_BLOCK)  # one buffer per call: input hashing runs beside a merge
    view = memoryview(buffer)
    with path.open("rb", buffering=0) as handle:
        while count := handle.readinto(buffer):
            digest.update(view[:count])
    return digest.hexdigest()


def read_json_object(path: Path, *, max_bytes: int, kind: str, fix: str,
                     where: str | None = None) -> dict[str, Any]:
    """The JSON object in ``path``, a file of at most ``max_bytes``.

    Args:
        path: the file to read.
        max_bytes: a bound far above any real file of its ``kind``, so a wrong file is not read whole.
        kind: what the file should be, as the error says it ("a tokenizer file").
        fix: what the user should do when it is broken ("restore the model's own tokenizer.json").
        where: how errors name the file (default: its path).

    Raises:
        CheckpointError: one line naming the file: too large, unreadable, not JSON, not an object.
    """
    where = where or str(path)
    try:
        if path.stat().st_size > max_bytes:
            raise CheckpointError(f"{where}: is larger than {max_bytes // 2**20} MiB; it is not {kind}")
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{where}: cannot read ({exc.strerror or exc})") from None
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{where}: is not valid JSON; {fix}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: holds a JSON {type(value).__name__}, not an object; {fix}")
    return value


def write_json(path: Path, payload: Any) -> None:
    """Write pretty JSON, mapping OS failures to one-line errors."""
    write_text(path, json.dumps(payload, indent=2) + "\n")


def write_text(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise write_error(path, exc) from None


@contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """A sibling temp path to write ``path`` through: renamed over ``path`` when the block ends,
    removed on any error, so ``path`` is either the old file or the complete new one.

    Raises:
        OutputWriteError: one line naming ``path`` when the OS refuses a write or the rename.

    Example:
        >>> with atomic_file(Path("answers.jsonl")) as temp:  # doctest: +SKIP
        ...     temp.write_text("{}\\n")
    """
    temp = path.with_name(f".{path.name}{PARTIAL_MARKER}{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        yield temp
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise write_error(path, exc) from None
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
