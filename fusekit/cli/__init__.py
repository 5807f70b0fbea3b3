"""The ``fusekit`` command line: one thin function per command; the work is in the library.

User mistakes (:class:`fusekit.errors.FusekitError`) print one line to stderr and exit with status 2;
``FUSEKIT_DEBUG=1`` shows the traceback instead. Ctrl-C exits 130 and SIGTERM 143, in both cases
after the partial output has been removed (or kept, with ``--resume``, and named). Nothing printed
ever holds the Hub token (:mod:`fusekit.redact`).

Start-up is kept short and interruptible: this module imports nothing heavy, :func:`main` installs
its signal handlers before typer, torch or any command module is imported, and ``--version`` is
answered without importing typer at all.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from types import FrameType

__all__ = ["app", "main"]

_EXIT_CODES: dict[int, int] = {signal.SIGINT: 130, signal.SIGTERM: 143}
_COMMAND_MODULES = ("cache", "ensemble", "hub", "lora", "merge", "moe", "route", "schema", "score", "select",
                    "serve", "tune")
_received: list[int] = []  # signals received during this run, in order
_raised: list[BaseException] = []  # the interrupt raised for the first one


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler so that cleanup runs as for Ctrl-C."""


def _on_signal(signum: int, frame: FrameType | None) -> None:
    """The first SIGINT/SIGTERM raises (cleanup runs); a second lets that cleanup finish; a third
    ends the process at once."""
    _received.append(signum)
    if len(_received) == 1:
        _raised.append(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())
        raise _raised[0]
    if len(_received) >= 3:
        os.write(2, b"fusekit: stopped again during cleanup; a hidden partial output may remain\n")
        os._exit(_EXIT_CODES.get(_received[0], 130))


def _install_signal_handlers() -> dict[int, Any]:
    """Handle SIGINT and SIGTERM from here on; return the handlers they replace.

    A signal the parent set to be ignored (a background job's SIGINT) stays ignored.
    """
    _received.clear()
    _raised.clear()
    previous: dict[int, Any] = {}
    for signum in _EXIT_CODES:
        try:
            if signal.getsignal(signum) is not signal.SIG_IGN:
                previous[signum] = signal.signal(signum, _on_signal)
        except ValueError:  # not the main thread: leave signals to whoever owns it
            break
    return previous


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: ``fusekit COMMAND [ARGS]...``; exits with the command's status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``). When None (the
            console script) and a signal stopped the run, the process ends as soon as the cleanup
            is done and the line is printed: interpreter shutdown, where Python puts the default
            handlers back, could otherwise be cut short by one more signal.

    Raises:
        SystemExit: always; 0 on success, 2 for a user mistake, 130 after Ctrl-C, 143 after SIGTERM.
    """
    previous = _install_signal_handlers()  # first, so that an interrupt during imports is handled
    try:
        if argv is None:  # this process ends with the command: glibc tuning cannot leak to a caller
            from fusekit.plan.process import allow_malloc_tuning

            allow_malloc_tuning()
        code = _main(sys.argv[1:] if argv is None else list(argv))
        if _received and argv is None:
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
            os._exit(code)
    except KeyboardInterrupt:  # before _main could catch it
        code = _report_interrupt()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    raise SystemExit(code)


def _main(args: list[str]) -> int:
    """Run the command line; every outcome becomes an exit status and at most one line (or, with
    ``FUSEKIT_DEBUG=1``, a scrubbed traceback) on stderr."""
    restore_logging = None
    try:
        if args == ["--version"]:  # answered before anything heavy is imported
            from fusekit.version import __version__

            sys.stdout.write(f"fusekit {__version__}\n")
            return 0
        import logging

        from fusekit.redact import scrub_log_records

        logging.basicConfig(format="fusekit: %(message)s", level=logging.WARNING, stream=sys.stderr)
        restore_logging = scrub_log_records()
        return _run_app(args)
    except KeyboardInterrupt:
        return _report_interrupt()
    except Exception as exc:
        return _report_error(exc)
    finally:
        if restore_logging is not None:
            restore_logging()


def _run_app(args: list[str]) -> int:
    """Import typer and the commands, run the app and turn its outcome into an exit status."""
    import typer

    from fusekit.errors import FusekitError

    application = _load_app()
    try:
        code = application(args=args, prog_name="fusekit", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            _write_line(f"error: {exc}")
        return int(getattr(exc, "exit_code", 2))
    except typer.Abort:
        code = 130
    except FusekitError as exc:
        return _report_error(exc)
    if _received or code == 130:
        return _report_interrupt()
    return code if isinstance(code, int) else 0


def _report_interrupt() -> int:
    """One line saying the run was stopped and what it left; the exit status of the signal."""
    from fusekit.errors import kept_partial

    folder = kept_partial(_raised[0]) if _raised else None
    if folder is not None:
        _write_line(f"interrupted; the partial output is kept in {folder}; run the same command "
                    "with --resume to continue it")
    else:
        _write_line("interrupted; no output was left behind")
    return _EXIT_CODES.get(_received[0], 130) if _received else 130


def _report_error(exc: Exception) -> int:
    """A user mistake is one line (exit 2); anything else is a bug and shows its traceback (exit 1).
    With ``FUSEKIT_DEBUG=1`` every error shows its traceback. Both are scrubbed of secrets."""
    from fusekit.errors import FusekitError
    from fusekit.redact import format_exception

    debug = os.environ.get("FUSEKIT_DEBUG") == "1"
    if isinstance(exc, FusekitError) and not debug:
        _write_line(f"error: {exc}")
        return exc.exit_code
    if _is_path_mistake(exc) and not debug:
        assert isinstance(exc, OSError)
        name = os.fsdecode(exc.filename)
        shown = name if len(name) <= 100 else name[:100] + "..."
        _write_line(f"error: {shown}: {exc.strerror}; check the path")
        return 2
    sys.stderr.write(format_exception(exc))
    sys.stderr.flush()
    return exc.exit_code if isinstance(exc, FusekitError) else 1


def _is_path_mistake(exc: Exception) -> bool:
    """An OSError the system raised for a path the user typed (too long, not a folder, no access,
    a symlink loop): a user mistake like any other, whichever check first touched the path."""
    import errno

    return (isinstance(exc, OSError) and exc.filename is not None
            and exc.errno in (errno.ENAMETOOLONG, errno.ENOTDIR, errno.ELOOP, errno.EACCES,
                              errno.EPERM, errno.ENOENT, errno.EISDIR))


def _write_line(message: str) -> None:
    from fusekit.redact import scrub

    sys.stderr.write(scrub(f"fusekit: {message}") + "\n")
    sys.stderr.flush()


def _load_app() -> Any:
    """The typer app with every command registered (each command module registers its own)."""
    import importlib

    for name in _COMMAND_MODULES:
        importlib.import_module(f"fusekit.cli.{name}")
    from fusekit.cli.app import app as application

    globals()["app"] = application  # importing the submodule fusekit.cli.app bound its name here
    return application


def __getattr__(name: str) -> Any:
    if name == "app":
        return _load_app()
    raise AttributeError(f"module 'fusekit.cli' has no attribute '{name}'")
