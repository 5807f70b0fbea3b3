"""The root ``fusekit`` Typer app; each command module registers its commands on it."""

from __future__ import annotations

from typing import Annotated

import typer

from fusekit.version import __version__

app = typer.Typer(
    name="fusekit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Merge, ensemble and route large language models from one recipe format.",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Merge, ensemble and route large language models from one recipe format."""
