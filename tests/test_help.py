"""``fusekit ... --help`` reads well: upper-case metavars on the usage line, no ``<bool>``, no option
name cut or split at 80 columns, text wrapped at spaces, an example for every command, commands in
the order a user needs them, and the same page whether or not rich is installed."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.main import get_command

from fusekit.cli import _COMMAND_MODULES, main
from fusekit.cli.helptext import COMMAND_ORDER, MAX_WIDTH, _example_lines, wrap

ROOT = Path(__file__).resolve().parent.parent


def _tree() -> dict[tuple[str, ...], Any]:
    """Every group and command of the app by its path: () for the root, ("route", "eval")."""
    for name in _COMMAND_MODULES:
        importlib.import_module(f"fusekit.cli.{name}")
    from fusekit.cli.app import app

    found: dict[tuple[str, ...], Any] = {}

    def walk(command: Any, path: tuple[str, ...]) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, (*path, name))

    walk(get_command(app), ())
    return found


TREE = _tree()


def _help(capsys: pytest.CaptureFixture[str], path: tuple[str, ...]) -> str:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*path, "--help"])
    out, err = capsys.readouterr()
    assert info.value.code in (0, None), err
    return out


def _flat(text: str) -> str:
    return " ".join(text.split())


def _problems(out: str, command: Any, path: tuple[str, ...], width: int) -> list[str]:
    """Everything that makes ``out``, the help page of ``command``, read badly at ``width`` columns."""
    problems = []
    usage = out.strip().splitlines()[0]
    if not re.fullmatch(rf"Usage: fusekit{''.join(' ' + p for p in path)} \[OPTIONS\]"
                        r"( [A-Z][A-Z0-9_]*(\.\.\.)?| \[[A-Z][A-Z0-9_]*\](\.\.\.)?| COMMAND \[ARGS\]\.\.\.)*",
                        usage):
        problems.append(f"usage line: {usage!r}")
    problems += [f"type label {m!r}" for m in re.findall(r"<[a-z][^<>]*>", out)]
    problems += [f"wider than {width}: {line!r}" for line in out.splitlines() if len(line) > width]
    problems += [f"word split at a hyphen: {line!r}" for line in out.splitlines() if re.search(r"\w-$", line)]
    flat = _flat(out)
    for param in command.params:
        for name in [*param.opts, *param.secondary_opts]:
            if name.startswith("-") and not re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", out):
                problems.append(f"option {name} is cut or missing")
        if param.help and _flat(param.help) not in flat:
            problems.append(f"help of {param.name} is cut: {param.help!r}")
    lines = out.splitlines()
    examples = [i for i, line in enumerate(lines) if line.strip() in ("Example:", "Examples:")]
    if not examples or not lines[examples[0] + 1].strip().startswith("fusekit"):
        problems.append("no 'Example:' line followed by a command")
    return problems


@pytest.mark.parametrize("path", list(TREE), ids=lambda p: " ".join(p) or "fusekit")
def test_every_help_page_reads_well_at_80_columns(path: tuple[str, ...], capsys: pytest.CaptureFixture[str],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")
    out = _help(capsys, path)
    assert _problems(out, TREE[path], path, 80) == [], out


def test_the_checks_catch_typers_own_layout(monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """The same checks on a page laid out by typer itself (rich or not) find what the issue found."""
    plain = typer.Typer(add_completion=False)

    @plain.command()
    def demo(recipe: Path, keep_every_intermediate_output_folder: bool = False) -> None:
        """Demo."""

    monkeypatch.setenv("COLUMNS", "80")
    command = get_command(plain)
    ctx = command.make_context("fusekit", ["--help"], resilient_parsing=True)
    page = command.get_help(ctx) + capsys.readouterr().out  # rich prints the page itself
    problems = _problems(page, command, (), 80)
    assert any("usage line" in p for p in problems) and any("Example" in p for p in problems), problems
    assert any("--keep-every-intermediate-output-folder is cut" in p for p in problems), problems


def test_commands_are_listed_in_the_order_a_user_needs_them(capsys: pytest.CaptureFixture[str]) -> None:
    for path, group in TREE.items():
        if not getattr(group, "commands", None):
            continue
        order = COMMAND_ORDER[group.name]
        assert set(group.commands) <= set(order), f"give {set(group.commands) - set(order)} a place"
        out = _help(capsys, path)
        listed = re.findall(r"^  (\S+)", out[out.index("\nCommands:\n"):], re.MULTILINE)
        assert listed[:len(group.commands)] == [n for n in order if n in group.commands], out
    assert COMMAND_ORDER["fusekit"][0] == "merge"


def _console_help(args: list[str], columns: int, rich: bool) -> str:
    env = {**os.environ, "COLUMNS": str(columns), "TYPER_USE_RICH": "1" if rich else "0"}
    proc = subprocess.run([sys.executable, "-m", "fusekit", *args, "--help"], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.parametrize("columns", [80, 120])
def test_help_is_the_same_with_and_without_rich(columns: int) -> None:
    with_rich, without = _console_help(["merge"], columns, True), _console_help(["merge"], columns, False)
    assert with_rich == without
    assert _problems(with_rich, TREE[("merge",)], ("merge",), min(columns, MAX_WIDTH)) == []
    if columns > 80:  # the wider terminal is used
        assert max(len(line) for line in with_rich.splitlines()) > 80


def test_wrap_breaks_at_spaces_only() -> None:
    text = "use --no-copy-tokenizer for weights-only checkpoints in /a/very/long/path/that/stays/whole"
    lines = wrap(text, 12, "  ")
    assert " ".join(line.strip() for line in lines) == text
    assert "--no-copy-tokenizer" in lines[1] and "weights-only" in lines[3] and lines[0] == "  use"


def test_long_examples_continue_with_a_backslash() -> None:
    command = "fusekit route run ./router --prompt 'def main(): return 1' --threshold 0.25 --json"
    lines = _example_lines(command, 44)
    assert all(line.endswith(" \\") for line in lines[:-1]) and len(lines) > 2
    assert " ".join(line.removesuffix(" \\").strip() for line in lines) == command
    assert any(line.strip().startswith("--prompt 'def main(): return 1'") for line in lines)
    assert all(len(line) <= 44 for line in lines)
