"""Bounded reads of the files a user names: recipes, lock files, JSONL prompts and data, texts to score.

Each reader refuses what is not a regular file (a folder, a FIFO, ``/dev/zero``, a socket) before
reading a byte, and reads at most ``limit + 1`` bytes, so a 300 MB recipe or an endless device neither
hangs nor exhausts memory. The refusal is one :class:`UserFileError` line naming the file, the limit
and the environment variable that raises it. A file that does not exist raises the built-in
:class:`FileNotFoundError` and undecodable bytes the built-in :class:`UnicodeDecodeError`, so callers
keep their own wording for those; :func:`iter_jsonl` words them itself.

Limits (bytes; each overridable with its environment variable, written as ``500MB``, ``2GiB``, ...):

================  ==========  ==============================
what              default     environment variable
================  ==========  ==============================
recipe            16 MiB      ``FUSEKIT_MAX_RECIPE_BYTES``
lock file         64 MiB      ``FUSEKIT_MAX_LOCK_BYTES``
JSONL file        1 GiB       ``FUSEKIT_MAX_DATA_BYTES``
one JSONL line    16 MiB      ``FUSEKIT_MAX_LINE_BYTES``
text to score     1 GiB       ``FUSEKIT_MAX_TEXT_BYTES``
================  ==========  ==============================
"""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from fusekit.errors import FusekitError
from fusekit.sizes import parse_size

MiB = 2**20


class UserFileError(FusekitError, ValueError):
    """A file the user named is not a regular file, is too large, or has a line that is too long."""


@dataclass(frozen=True)
class Limit:
    """A byte limit with a default and the environment variable that overrides it."""

    default: int
    env: str

    def bytes(self) -> int:
        """The limit in force: ``$env`` parsed as a size when set, else ``default``.

        Raises:
            FusekitError: the environment variable is not a size.
        """
        text = os.environ.get(self.env, "").strip()
        return parse_size(text, self.env) if text else self.default


RECIPE_LIMIT = Limit(16 * MiB, "FUSEKIT_MAX_RECIPE_BYTES")
LOCK_LIMIT = Limit(64 * MiB, "FUSEKIT_MAX_LOCK_BYTES")
DATA_LIMIT = Limit(1024 * MiB, "FUSEKIT_MAX_DATA_BYTES")
LINE_LIMIT = Limit(16 * MiB, "FUSEKIT_MAX_LINE_BYTES")
TEXT_LIMIT = Limit(1024 * MiB, "FUSEKIT_MAX_TEXT_BYTES")


def _size_text(size: int) -> str:
    return f"{size / MiB:.1f} MiB" if size >= MiB else f"{size} bytes"


def _resolve(limit: int | Limit) -> tuple[int, str]:
    """(bytes, how to raise it) for a limit given as a number or a :class:`Limit`."""
    if isinstance(limit, Limit):
        return limit.bytes(), f"; set {limit.env} to raise the limit"
    return limit, ""


def _kind(mode: int) -> str | None:
    """What a non-regular file is, or None for a regular file."""
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
             (stat.S_ISSOCK, "a socket"))
    for test, name in kinds:
        if test(mode):
            return name
    return None if stat.S_ISREG(mode) else "not a regular file"


def open_user_file(path: Path | str, *, what: str, limit: int | Limit) -> BinaryIO:
    """Open a user-named file for reading after checking that it is a regular file within ``limit``.

    The file is opened without blocking (a FIFO would otherwise wait for a writer) and checked with
    ``fstat`` on the open descriptor, so a path swapped between check and read cannot slip through.

    Args:
        path: the file.
        what: what the file is, for messages (``"recipe"``, ``"data file"``).
        limit: the largest size accepted, in bytes or as a :class:`Limit`.

    Returns:
        The file, opened in binary mode; the caller closes it.

    Raises:
        FileNotFoundError: the file does not exist (callers word this themselves).
        UserFileError: the path is a folder, FIFO, device or socket, or the file exceeds ``limit``.
    """
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except IsADirectoryError:
        raise UserFileError(f"{what} {path}: is a folder, not a file; give the path of a file") from None
    try:
        info = os.fstat(fd)
        kind = _kind(info.st_mode)
        if kind is not None:
            raise UserFileError(f"{what} {path}: is {kind}, not a regular file; give the path of a file")
        most, hint = _resolve(limit)
        if info.st_size > most:
            raise UserFileError(f"{what} {path}: {_size_text(info.st_size)} is larger than the "
                                f"{_size_text(most)} limit for a {what}{hint}")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_user_bytes(path: Path | str, *, what: str, limit: int | Limit) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes (a file that grows while read is refused).

    Args:
        path: the file.
        what: what the file is, for messages.
        limit: the largest size accepted, in bytes or as a :class:`Limit`.

    Returns:
        The file's content.

    Raises:
        FileNotFoundError: the file does not exist.
        UserFileError: not a regular file, or larger than ``limit``.
    """
    most, hint = _resolve(limit)
    with open_user_file(path, what=what, limit=limit) as handle:
        data = handle.read(most + 1)
    if len(data) > most:
        raise UserFileError(f"{what} {path}: larger than the {_size_text(most)} limit for a {what}{hint}")
    return data


def read_user_text(path: Path | str, *, what: str, limit: int | Limit,
                   max_line_bytes: int | Limit | None = None) -> str:
    """The UTF-8 text of a regular file of at most ``limit`` bytes, lines optionally bounded too.

    Args:
        path: the file.
        what: what the file is, for messages (``"recipe"``, ``"prompts file"``).
        limit: the largest size accepted, in bytes or as a :class:`Limit`.
        max_line_bytes: when given, a line longer than this is an error naming its number.

    Returns:
        The decoded text.

    Raises:
        FileNotFoundError: the file does not exist.
        UnicodeDecodeError: the file is not UTF-8.
        UserFileError: not a regular file, larger than ``limit``, or a line longer than
            ``max_line_bytes``.

    Example:
        >>> read_user_text("configs/linear.yaml", what="recipe", limit=RECIPE_LIMIT)  # doctest: +SKIP
    """
    data = read_user_bytes(path, what=what, limit=limit)
    if max_line_bytes is not None:
        _check_lines(data, path, what, max_line_bytes)
    return data.decode("utf-8")


def _check_lines(data: bytes, path: Path | str, what: str, max_line_bytes: int | Limit) -> None:
    most, hint = _resolve(max_line_bytes)
    start, number = 0, 1
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        if end - start > most:
            raise UserFileError(f"{path}:{number}: the line is longer than the {_size_text(most)} "
                                f"limit for a line of a {what}{hint}")
        start, number = end + 1, number + 1


def iter_jsonl(path: Path | str, *, what: str, max_line_bytes: int | Limit = LINE_LIMIT,
               max_bytes: int | Limit = DATA_LIMIT) -> Iterator[tuple[int, Any]]:
    """Parse a JSON lines file one bounded line at a time; blank lines are skipped.

    Args:
        path: the JSONL file.
        what: what the file is, for messages.
        max_line_bytes: the longest line accepted.
        max_bytes: the largest file accepted.

    Yields:
        ``(line number, parsed JSON value)``, line numbers counted from 1.

    Raises:
        FileNotFoundError: the file does not exist.
        UserFileError: not a regular file, too large, a line too long, not UTF-8 or not JSON; the
            message names the file and line.

    Example:
        >>> for number, row in iter_jsonl("data.jsonl", what="data file"):  # doctest: +SKIP
        ...     print(number, row["text"])
    """
    line_most, line_hint = _resolve(max_line_bytes)
    most, hint = _resolve(max_bytes)
    total = 0
    with open_user_file(path, what=what, limit=max_bytes) as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(line_most + 2), b""), start=1):
            total += len(raw)
            if total > most:  # the file grew after it was opened
                raise UserFileError(f"{what} {path}: larger than the {_size_text(most)} limit for a "
                                    f"{what}{hint}")
            if len(raw.rstrip(b"\r\n")) > line_most:
                raise UserFileError(f"{path}:{number}: the line is longer than the "
                                    f"{_size_text(line_most)} limit for a line of a {what}{line_hint}")
            if raw.strip():
                yield number, _parse_line(raw, path, number)


def _parse_line(raw: bytes, path: Path | str, number: int) -> Any:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserFileError(f"{path}:{number}: not UTF-8 text (byte {exc.start} of the line)") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserFileError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno}); "
                            "write one JSON value per line") from None
    except RecursionError:
        raise UserFileError(f"{path}:{number}: the JSON nests too deeply") from None
