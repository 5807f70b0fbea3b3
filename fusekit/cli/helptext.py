"""How every ``fusekit ... --help`` page is laid out: the same text with or without rich installed.

Typer's own layouts cut long option names to fit rich's table columns at 80 columns, break words at
hyphens, print ``<bool>`` after flags and ``{recipe}`` for arguments. Every group and command of the
app is built from the classes here instead (:class:`FusekitTyper` makes them the default), which
write the page themselves:

- the usage line names arguments in upper case: ``fusekit merge [OPTIONS] RECIPE OUT_DIR``;
- an option's value is an upper-case metavar (``--max-memory SIZE``, ``--device [cpu|cuda|auto]``),
  and a flag shows none;
- text wraps at spaces only, so no option name, path or hyphenated word is ever split; an option
  name wider than the first column gets a line of its own;
- an ``Example:`` paragraph of an epilog holds one command per line, each continued with `` \\``
  where it is wider than the terminal, so that it can be pasted as it is shown;
- a group lists its commands in :data:`COMMAND_ORDER` (``merge`` first), each with its first
  sentence.

Example:
    >>> wrap("a --very-long-option-name b", 12)
    ['a', '--very-long-option-name', 'b']
"""

from __future__ import annotations

import inspect
import re
import textwrap
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperCommand, TyperGroup

if TYPE_CHECKING:
    from typer._click.core import Command, Context
    from typer._click.formatting import HelpFormatter

__all__ = ["COMMAND_ORDER", "FusekitCommand", "FusekitGroup", "FusekitTyper", "wrap"]

# The order a user needs them in, per group (by the group's name); commands not named come last.
COMMAND_ORDER: dict[str, tuple[str, ...]] = {
    "fusekit": ("merge", "plan", "validate", "push", "tune", "moe", "score", "ensemble", "route", "select",
                "serve", "lora", "schema", "cache"),
    "ensemble": ("check", "generate", "score", "learn-weights"),
    "route": ("build", "eval", "calibrate", "run"),
    "lora": ("extract",),
    "cache": ("info", "clear"),
}
MAX_WIDTH = 100  # wider terminals get this many columns: longer lines of prose read badly
_FIRST_COLUMN = 30  # the widest option column; a longer name gets a line of its own
_GAP = 2
_INDENT = "  "
_TYPE_NAMES = {"str": "TEXT", "int": "INT", "float": "FLOAT", "path": "PATH", "bool": "BOOL"}
_EXAMPLE = re.compile(r"(Examples?):\s*(.*)", re.DOTALL)
_SHELL_WORD = re.compile(r"""(?:"[^"]*"|'[^']*'|\S)+""")  # a quoted string stays one word


def wrap(text: str, width: int, indent: str = "", hang: str | None = None) -> list[str]:
    """One paragraph wrapped at spaces, never inside a word, option name or path.

    Args:
        text: The paragraph; runs of whitespace, newlines included, count as one space.
        width: The widest line wanted (a single word wider than this stays whole).
        indent: Put before the first line.
        hang: Put before every later line (default: ``indent``).

    Returns:
        The lines, without newlines; one empty line for empty text.
    """
    wrapper = textwrap.TextWrapper(width=max(width, len(indent) + 10), initial_indent=indent,
                                   subsequent_indent=indent if hang is None else hang,
                                   break_on_hyphens=False, break_long_words=False)
    return wrapper.wrap(" ".join(text.split())) or [""]


def _paragraphs(text: str) -> list[str]:
    """A help text's paragraphs (separated by blank lines), up to a form feed."""
    body = inspect.cleandoc(text).partition("\f")[0]
    return [p for p in re.split(r"\n\s*\n", body) if p.strip()]


def _metavar(match: re.Match[str]) -> str:
    """Typer's ``<int range>``, ``<list[Path]>``, ``<cpu|cuda>`` as ``INT``, ``PATH``, ``[cpu|cuda]``."""
    label = match.group(1).removeprefix("list[").removesuffix("]")
    if "|" in label:
        return f"[{label}]"
    base = label.split()[0].lower() if label.split() else label
    return _TYPE_NAMES.get(base, base.upper())


def argument_name(param: Any) -> str:
    """An argument as the usage line and the Arguments section show it: ``RECIPE``, ``MODELS...``."""
    name = str(param.metavar or param.name or "").upper()
    return name + ("..." if param.nargs != 1 else "")


def usage_pieces(command: Command, ctx: Context) -> list[str]:
    """``[OPTIONS]``, then each argument (``[NAME]`` when optional), then a group's ``COMMAND``."""
    pieces = [command.options_metavar] if command.options_metavar else []
    for param in command.get_params(ctx):
        if param.param_type_name == "argument":
            name = argument_name(param)
            pieces.append(name if param.required else f"[{name}]")
    if isinstance(command, TyperGroup):
        pieces.append(command.subcommand_metavar or "COMMAND [ARGS]...")
    return pieces


def _sections(command: Command, ctx: Context) -> dict[str, list[tuple[str, str]]]:
    """Rows (name, help) of the Arguments, Options and other option panels, in that order."""
    sections: dict[str, list[tuple[str, str]]] = {"Arguments": [], "Options": []}
    for param in command.get_params(ctx):
        record = param.get_help_record(ctx)
        if record is None:  # hidden
            continue
        if param.param_type_name == "argument":
            sections["Arguments"].append((argument_name(param), record[1]))
        else:
            panel = getattr(param, "rich_help_panel", None) or "Options"
            names = re.sub(r"<([^<>]+)>", _metavar, record[0])
            sections.setdefault(panel, []).append((names, record[1]))
    return {title: rows for title, rows in sections.items() if rows}


def _summary(command: Command) -> str:
    """A command's first sentence (its short help when it has one), for its group's list."""
    if command.short_help:
        return " ".join(command.short_help.split())
    first = " ".join((_paragraphs(command.help or "") or [""])[0].split())
    return re.split(r"(?<=[a-z)])\.\s", first, maxsplit=1)[0]


def _write_rows(formatter: HelpFormatter, rows: Sequence[tuple[str, str]]) -> None:
    """A definition list: names in the first column, help wrapped at spaces in the second."""
    column = min(max(len(name) for name, _ in rows), _FIRST_COLUMN) + _GAP
    hang = " " * (len(_INDENT) + column)
    for name, text in rows:
        lines = wrap(text, formatter.width, hang, hang) if text else [""]
        if len(name) > column - _GAP:  # on its own line; the help starts below it
            formatter.write(f"{_INDENT}{name}\n")
            formatter.write("".join(f"{line}\n" for line in lines if line))
            continue
        first = f"{_INDENT}{name.ljust(column)}{lines[0].lstrip()}".rstrip()
        formatter.write("".join(f"{line}\n" for line in [first, *lines[1:]]))


def _example_lines(command: str, width: int) -> list[str]:
    """One example command, continued with `` \\`` onto further lines where it is too wide (an
    option stays on the line of its value)."""
    units: list[str] = []
    for word in _SHELL_WORD.findall(command):
        joins = units and units[-1].startswith("-") and " " not in units[-1] and not word.startswith("-")
        units.append(f"{units.pop()} {word}" if joins else word)
    lines = [_INDENT * 2]
    for word in units:
        if lines[-1].strip() and len(lines[-1]) + 1 + len(word) + 2 > width:
            lines[-1] += " \\"
            lines.append(_INDENT * 4 + word)
        else:
            lines[-1] += f" {word}" if lines[-1].strip() else word
    return lines


def _write_epilog(formatter: HelpFormatter, epilog: str) -> None:
    """An epilog's paragraphs; an ``Example:`` paragraph holds one command per line."""
    for paragraph in _paragraphs(epilog):
        formatter.write("\n")
        example = _EXAMPLE.fullmatch(paragraph.strip())
        if example is None:
            formatter.write("".join(f"{line}\n" for line in wrap(paragraph, formatter.width, _INDENT)))
            continue
        formatter.write(f"{_INDENT}{example.group(1)}:\n")
        for command in example.group(2).splitlines():
            if command.strip():
                formatter.write("".join(f"{line}\n" for line in _example_lines(command, formatter.width)))


def write_usage(command: Command, ctx: Context, formatter: HelpFormatter) -> None:
    """The usage line, wrapped under its own start."""
    prefix = f"Usage: {ctx.command_path} "
    lines = wrap(" ".join(usage_pieces(command, ctx)), formatter.width, prefix, " " * len(prefix))
    formatter.write("".join(f"{line}\n" for line in lines))


def write_help(command: Command, ctx: Context, formatter: HelpFormatter) -> None:
    """The whole help page of a command or group."""
    write_usage(command, ctx, formatter)
    for paragraph in _paragraphs(command.help or ""):
        formatter.write("\n" + "".join(f"{line}\n" for line in wrap(paragraph, formatter.width, _INDENT)))
    for title, rows in _sections(command, ctx).items():
        formatter.write(f"\n{title}:\n")
        _write_rows(formatter, rows)
    if isinstance(command, TyperGroup):
        rows = [(name, _summary(sub)) for name in command.list_commands(ctx)
                if (sub := command.get_command(ctx, name)) is not None and not sub.hidden]
        if rows:
            formatter.write("\nCommands:\n")
            _write_rows(formatter, rows)
    if command.epilog:
        _write_epilog(formatter, command.epilog)


class FusekitCommand(TyperCommand):
    """A command whose help page is laid out by :func:`write_help`."""

    def format_usage(self, ctx: Context, formatter: HelpFormatter) -> None:
        write_usage(self, ctx, formatter)

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        write_help(self, ctx, formatter)


class FusekitGroup(TyperGroup):
    """A group whose help page is laid out by :func:`write_help`, commands in :data:`COMMAND_ORDER`."""

    def format_usage(self, ctx: Context, formatter: HelpFormatter) -> None:
        write_usage(self, ctx, formatter)

    def format_help(self, ctx: Context, formatter: HelpFormatter) -> None:
        write_help(self, ctx, formatter)

    def list_commands(self, ctx: Context) -> list[str]:
        registered = super().list_commands(ctx)
        order = COMMAND_ORDER.get(self.name or "", ())
        return [n for n in order if n in registered] + [n for n in registered if n not in order]


class FusekitTyper(typer.Typer):
    """A Typer app whose groups and commands are :class:`FusekitGroup` and :class:`FusekitCommand`.

    Example:
        >>> app = FusekitTyper(name="demo", help="A demo.")
    """

    def __init__(self, *, cls: type[TyperGroup] | None = None, **kwargs: Any) -> None:
        super().__init__(cls=cls or FusekitGroup, **kwargs)

    def command(self, name: str | None = None, *, cls: type[TyperCommand] | None = None,
                **kwargs: Any) -> Callable[[Any], Any]:
        """Register a command, a :class:`FusekitCommand` unless ``cls`` says otherwise."""
        return super().command(name, cls=cls or FusekitCommand, **kwargs)
