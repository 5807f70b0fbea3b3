"""The root ``fusekit`` Typer app; each command module registers its commands on it.

Usage mistakes that Typer finds itself (an unknown option, a bad ``--device`` value, a missing
argument) leave the app as a one-line :class:`~fusekit.errors.FusekitError` naming the option and the
command's ``--help``, like every other user mistake: exit status 2, no usage block.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Annotated, Any

import typer

from fusekit.cli.helptext import MAX_WIDTH, FusekitGroup, FusekitTyper
from fusekit.errors import FusekitError
from fusekit.version import __version__


def usage_error_line(exc: typer.TyperException, argv: Sequence[str]) -> str | None:
    """One line for a Typer usage error, or None for anything else (help shown for no arguments).

    Args:
        exc: The exception Typer raised while parsing the command line.
        argv: The command line it parsed, to quote a rejected value that Typer's message leaves out.

    Returns:
        Typer's message on one line with the value quoted, followed by the command's ``--help`` hint.

    Example:
        ``fusekit score m --text t --batch-size 0`` gives "Invalid value for '--batch-size': Input
        should be greater than or equal to 1, got '0' (see: fusekit score --help)".
    """
    ctx = getattr(exc, "ctx", None)
    if getattr(exc, "exit_code", None) != 2 or ctx is None or type(exc).__name__ == "NoArgsIsHelpError":
        return None
    message = " ".join(exc.format_message().replace("Value error, ", "").split()).rstrip(".")
    value = _given_value(getattr(getattr(exc, "param", None), "opts", None) or [], argv)
    if value is not None and repr(value) not in message:
        message += f", got {value!r}"
    return f"{message} (see: {ctx.command_path} --help)"


def _given_value(flags: Sequence[str], argv: Sequence[str]) -> str | None:
    """The last value given on the command line for an option spelled by any of ``flags``."""
    found = None
    for i, arg in enumerate(argv):
        name, eq, inline = arg.partition("=")
        if name in flags and name.startswith("-"):
            found = inline if eq else (argv[i + 1] if i + 1 < len(argv) else None)
    return found


class _OneLineErrors(FusekitGroup):
    """The root command group: its usage errors become one-line FusekitErrors."""

    def main(self, args: Sequence[str] | None = None, *rest: Any, **kwargs: Any) -> Any:
        try:
            return super().main(args, *rest, **kwargs)
        except typer.TyperException as exc:
            line = usage_error_line(exc, list(args) if args is not None else sys.argv[1:])
            if line is None:
                raise
            raise FusekitError(line) from None


app = FusekitTyper(
    name="fusekit", cls=_OneLineErrors, no_args_is_help=True, add_completion=True,
    pretty_exceptions_enable=False, context_settings={"max_content_width": MAX_WIDTH},
    help="Merge, ensemble and route large language models from one recipe format.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusekit {__version__}")
        raise typer.Exit()


@app.callback(epilog="Example: fusekit merge configs/linear.yaml ./merged\n\n"
                     "Each command's options and an example: fusekit COMMAND --help")
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Merge, ensemble and route large language models from one recipe format."""
