"""Where a command may write: outputs that never hold their inputs, and one writer per output.

Every command that writes a folder (``merge``, ``moe``, ``route build``, ``route calibrate --out``)
claims it with :func:`claim_output` for the whole run. The claim

1. refuses, whatever the options, an output that is, holds or lies inside any input (model,
   tokenizer source, recipe, data file), and the current folder, ``/``, ``~`` and the home folder
   (:func:`fusekit.io.writer.check_output_location`);
2. refuses an existing non-empty folder unless ``--overwrite`` was given *and* the folder holds a
   previous fusekit output (its marker file, ``fusekit.lock`` for merges); any other folder is
   refused with what it holds, so ``--overwrite`` can never delete a user's files;
3. holds an advisory ``fcntl`` lock on ``.OUT_DIR.fusekit-lock`` beside the output (so it works
   before the folder exists), so a second run aimed at the same output refuses at once; the kernel
   releases the lock if the process dies.

``--out FILE`` options are checked with :func:`check_out_file`.

Example:
    >>> with claim_output("merged", inputs=[("model 'a'", Path("a"))]) as out:  # doctest: +SKIP
    ...     write_the_output(out)
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from fusekit.errors import OutputBusyError, OutputExistsError, OutputPathError, OutputWriteError
from fusekit.io.lock import LOCK_FILE, model_files
from fusekit.io.refs import ResolvedModel
from fusekit.io.writer import check_output_location

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, the other rules still hold
    fcntl = None  # type: ignore[assignment]

LOCK_SUFFIX = ".fusekit-lock"
InputPaths = Iterable[tuple[str, str | Path]]  # (what it is, e.g. "model 'org/x'", its path)


def model_inputs(models: Iterable[ResolvedModel]) -> list[tuple[str, Path]]:
    """The paths an output must stay clear of, for each model: its folder when the reference names a
    folder (or a Hub snapshot), else the files read from beside a single weights file."""
    found: list[tuple[str, Path]] = []
    for model in models:
        label = f"model '{model.ref}'"
        if model.hub_id is not None or Path(model.ref).expanduser().is_dir():
            found.append((label, model.folder))
        else:
            found.extend((label, path) for path in model_files(model).values())
    return found


def check_output_path(out: str | Path, *, inputs: InputPaths = (), what: str = "output folder") -> Path:
    """Refuse an output path that is unsafe (see :func:`check_output_location`) or that is, holds or
    lies inside one of ``inputs``; return it resolved.

    Raises:
        OutputPathError: one line naming the output, the input and what to do.
    """
    resolved = check_output_location(out, what=what)
    for label, path in inputs:
        target = Path(os.path.abspath(path)).resolve()
        if resolved == target:
            relation = "is"
        elif resolved in target.parents:
            relation = "holds"
        elif target in resolved.parents:
            relation = "lies inside"
        else:
            continue
        raise OutputPathError(f"{what} '{out}' {relation} the input {label} ({path}); writing there "
                              "could destroy it, so write the output to a folder outside every input")
    return resolved


def check_output_contents(out: Path, *, overwrite: bool, update: bool = False,
                          markers: Sequence[str] = (LOCK_FILE,)) -> None:
    """Refuse an output folder whose current content may not be replaced.

    Args:
        out: the output folder (it may not exist yet).
        overwrite: the user asked to replace a previous output.
        update: a previous fusekit output may stay for now (the caller checks it is up to date).
        markers: files whose presence shows the folder holds a previous fusekit output.

    Raises:
        OutputExistsError: ``out`` is a file, or a non-empty folder that is not a fusekit output (even
            with ``overwrite``), or a fusekit output without ``overwrite`` or ``update``.
    """
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"output '{out}' is a file; choose a folder path")
    try:
        entries = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    except OSError as exc:
        raise OutputWriteError(f"cannot read output folder {out}: {exc.strerror or exc}") from None
    if not entries:
        return
    previous = any((out / marker).is_file() for marker in markers)
    if previous and (overwrite or update):
        return
    if not overwrite:
        raise OutputExistsError(f"output folder '{out}' already exists and is not empty; choose "
                                "another folder or pass --overwrite")
    shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
    raise OutputExistsError(f"output folder '{out}' holds {len(entries)} entries ({shown}) but no "
                            f"{markers[0]}, so it is not a fusekit output and --overwrite will not "
                            "replace it; empty it or choose another folder")


def lock_path(out: str | Path) -> Path:
    """The file beside ``out`` that runs writing ``out`` lock: ``.NAME.fusekit-lock``."""
    resolved = Path(os.path.abspath(out)).resolve()
    return resolved.parent / f".{resolved.name}{LOCK_SUFFIX}"


@contextlib.contextmanager
def output_lock(out: str | Path) -> Iterator[None]:
    """Hold the advisory lock of ``out`` for the block; refuse at once when another run holds it.

    The lock file is removed when the block ends (while still locked, so no run can lock a file
    that is being removed); one left by a killed process is unlocked and simply reused.

    Raises:
        OutputBusyError: another process (or claim in this process) is writing ``out``.
    """
    path = lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputWriteError(f"cannot create {path.parent}: {exc.strerror or exc}") from None
    if fcntl is None:  # pragma: no cover
        yield
        return
    fd = _acquire(path, out)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


def _acquire(path: Path, out: str | Path) -> int:
    """Open and lock ``path``; retry when another run removed it between our open and lock."""
    for _ in range(50):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise OutputWriteError(f"cannot create the lock file {path}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = _read_pid(fd)
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EWOULDBLOCK, errno.EACCES):
                raise OutputWriteError(f"cannot lock {path}: {exc.strerror or exc}") from None
            pid = f" (pid {holder})" if holder else ""
            raise OutputBusyError(f"output folder '{out}' is being written by another fusekit run{pid}; "
                                  "wait for it to finish or choose another folder") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            with contextlib.suppress(OSError):  # the pid only makes the busy message friendlier
                os.ftruncate(fd, 0)
                os.write(fd, f"{os.getpid()}\n".encode())
            return fd
        os.close(fd)
    raise OutputBusyError(f"output folder '{out}': could not take its lock {path}; another run keeps "
                          "replacing it, try again")


def _read_pid(fd: int) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        return int(os.pread(fd, 32, 0).decode().strip())
    return None


@contextlib.contextmanager
def claim_output(out: str | Path, *, inputs: InputPaths = (), overwrite: bool = False,
                 update: bool = False, markers: Sequence[str] = (LOCK_FILE,)) -> Iterator[Path]:
    """Check ``out`` against the output rules and hold its lock for the block; yield ``Path(out)``.

    Args:
        out: the output folder.
        inputs: (label, path) of everything the run reads; ``out`` may not be, hold or lie in one.
        overwrite: replace a previous fusekit output (only one: see :func:`check_output_contents`).
        update: let a previous fusekit output stay while the caller checks it (merge's up-to-date
            check, which raises itself when the output is stale).
        markers: the files that show a folder holds this command's previous output.

    Raises:
        OutputPathError: ``out`` is unsafe or overlaps an input.
        OutputExistsError: ``out`` holds content that may not be replaced.
        OutputBusyError: another run is writing ``out``.

    Example:
        >>> with claim_output("merged", inputs=model_inputs(models), overwrite=True) as out:
        ...     ...  # doctest: +SKIP
    """
    out = Path(out)
    check_output_path(out, inputs=inputs)
    check_output_contents(out, overwrite=overwrite, update=update, markers=markers)
    with output_lock(out):
        check_output_contents(out, overwrite=overwrite, update=update, markers=markers)
        yield out


def check_out_file(path: str | Path, *, inputs: InputPaths = (), option: str = "--out") -> Path:
    """Refuse a ``--out FILE`` path that cannot be written safely; return it as a Path.

    Refused: an empty path, a folder, anything that exists but is not a regular file (a device such
    as ``/dev/null`` would be replaced by the rename that writes the file atomically), a path whose
    folder does not exist, and any of ``inputs``.

    Raises:
        OutputPathError: one line naming the option, the path and what to write instead.

    Example:
        >>> check_out_file("answers.jsonl", inputs=[("the prompts", "prompts.jsonl")])  # doctest: +SKIP
    """
    text = os.fspath(path)
    if not text.strip():
        raise OutputPathError(f"{option} '': give the path of a file to write")
    target = Path(text)
    if target.is_dir():
        raise OutputPathError(f"{option} '{text}' is a folder; give a file path such as "
                              f"{target / 'out.jsonl'}")
    if target.exists() and not stat.S_ISREG(target.stat().st_mode):
        raise OutputPathError(f"{option} '{text}' exists and is not a regular file; give a file path")
    if not target.parent.is_dir():
        raise OutputPathError(f"{option} '{text}': folder {target.parent} does not exist; create it "
                              "first")
    resolved = target.resolve()
    for label, source in inputs:
        if Path(source).resolve() == resolved:
            raise OutputPathError(f"{option} '{text}' is the input {label}; writing it would destroy "
                                  "it, so choose another file")
    return target
