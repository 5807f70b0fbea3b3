"""The ``fusekit`` command line: one thin function per command; the work is in the library.

User mistakes (:class:`fusekit.errors.FusekitError`) print one line to stderr and exit with status 2;
``FUSEKIT_DEBUG=1`` shows the traceback instead. Ctrl-C exits 130 and SIGTERM 143, in both cases
after the partial output has been removed.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import NoReturn

import typer

# Each command module registers its commands on ``app`` when imported; keep one line per module.
from fusekit.cli import ensemble as _ensemble_commands  # noqa: F401
from fusekit.cli import hub as _hub_commands  # noqa: F401
from fusekit.cli import merge as _merge_commands  # noqa: F401
from fusekit.cli import moe as _moe_commands  # noqa: F401
from fusekit.cli import route as _route_commands  # noqa: F401
from fusekit.cli import score as _score_commands  # noqa: F401
from fusekit.cli.app import app
from fusekit.errors import FusekitError

__all__ = ["app", "main"]


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler so that cleanup runs as for Ctrl-C."""


_signals: list[int] = []  # typer turns KeyboardInterrupt into exit code 130; this says which


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    _signals.append(signum)
    raise Terminated()


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"fusekit: {message}", err=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(format="fusekit: %(message)s", level=logging.WARNING, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _on_sigterm)
    debug = os.environ.get("FUSEKIT_DEBUG") == "1"
    try:
        code = app(args=argv, prog_name="fusekit", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"fusekit: error: {exc}", err=True)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except FusekitError as exc:
        if debug:
            raise
        _fail(f"error: {exc}", exc.exit_code)
    if _signals or code == 130:
        _fail("interrupted; no output was left behind", 143 if _signals else 130)
    raise SystemExit(code if isinstance(code, int) else 0)
