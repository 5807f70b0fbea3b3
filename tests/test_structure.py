"""The package's import rules, read from the source with ``ast``: no import cycles, layers that stay
apart (operators know nothing of files, recipes or the CLI; nothing below the CLI imports it; the
library never imports the demo builders), and a library that works without typer.

The cycle rule counts module-level imports only (an import inside a function, or under
``if TYPE_CHECKING:``, runs later or never, so it cannot deadlock a first import); the layering rules
count every import, wherever it is.

(That the plain merge path never imports transformers is checked by running a merge:
``tests/test_cli.py::test_the_merge_path_never_imports_transformers``.)
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fusekit"


def module_name(path: Path) -> str:
    """``fusekit/a/b.py`` → ``fusekit.a.b``; ``fusekit/a/__init__.py`` → ``fusekit.a``."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES: dict[str, Path] = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(node: ast.stmt) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    """Statements run when the module is first imported: into ``if``/``try``/``with``/class bodies,
    not into functions, and not into ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or _is_type_checking(node):
            continue
        yield node
        if isinstance(node, ast.ClassDef):
            yield from _module_level(node.body)
        elif isinstance(node, (ast.If, ast.While, ast.For)):
            yield from _module_level(node.body + node.orelse)
        elif isinstance(node, ast.With):
            yield from _module_level(node.body)
        elif isinstance(node, ast.Try):
            yield from _module_level(node.body + node.orelse + node.finalbody
                                     + [s for h in node.handlers for s in h.body])


def _targets(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """The modules an import statement names: ``from a import b`` names ``a.b`` when that is a
    module of the package, else ``a``; relative imports are resolved against ``importer``."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        is_package = PACKAGE.parent.joinpath(*importer.split(".")).is_dir()
        package = importer if is_package else importer.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]


def imports(module: str, *, module_level_only: bool) -> set[str]:
    """Every module ``module`` imports (all of them, or those imported when it is first imported)."""
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    nodes = _module_level(tree.body) if module_level_only else ast.walk(tree)
    return {t for n in nodes if isinstance(n, (ast.Import, ast.ImportFrom)) for t in _targets(n, module)}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in sorted(graph):
        if state.get(root):
            continue
        path, stack = [root], [iter(sorted(graph[root]))]
        state[root] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def _internal_graph(*, module_level_only: bool) -> dict[str, set[str]]:
    return {m: {t for t in imports(m, module_level_only=module_level_only) if t in MODULES}
            for m in MODULES}


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def _violations(importers: tuple[str, ...], forbidden: tuple[str, ...],
                exempt: tuple[str, ...] = ()) -> list[str]:
    """``importer -> target`` for every import (anywhere in the file) from a module inside
    ``importers`` (and not inside ``exempt``) of a module inside ``forbidden``."""
    return [f"{m} -> {t}" for m in MODULES if _in(m, *importers) and not _in(m, *exempt)
            for t in sorted(imports(m, module_level_only=False)) if _in(t, *forbidden)]


# --- the helpers themselves ------------------------------------------------------------------------


def test_find_cycle_finds_one_and_only_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"a"}}) == ["a", "a"]
    assert find_cycle({"x": {"a", "b"}, "a": set(), "b": {"a"}}) is None  # a diamond is no cycle


def test_imports_reads_module_level_and_nested_imports_apart() -> None:
    source = ("import os\nfrom typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import fusekit.cli\n"
              "try:\n    import fusekit.errors\nexcept ImportError:\n    pass\n"
              "def f():\n    from fusekit.io import reader\n")
    tree = ast.parse(source)
    top = {t for n in _module_level(tree.body) if isinstance(n, (ast.Import, ast.ImportFrom))
           for t in _targets(n, "fusekit.errors")}
    assert top == {"os", "typing", "fusekit.errors"}
    everything = {t for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
                  for t in _targets(n, "fusekit.errors")}
    assert everything == top | {"fusekit.cli", "fusekit.io.reader"}


def test_relative_imports_resolve_against_the_importer() -> None:
    node = ast.parse("from .. import errors\nfrom .reader import X").body
    assert isinstance(node[0], ast.ImportFrom) and isinstance(node[1], ast.ImportFrom)
    assert _targets(node[0], "fusekit.io.writer") == ["fusekit.errors"]
    assert _targets(node[1], "fusekit.io") == ["fusekit.io.reader"]


# --- the rules --------------------------------------------------------------------------------------


def test_the_package_is_found() -> None:
    assert {"fusekit", "fusekit.merging", "fusekit.ops", "fusekit.demo", "fusekit.route.router",
            "fusekit.io.reader"} <= set(MODULES)


def test_no_import_cycles_at_module_level() -> None:
    cycle = find_cycle(_internal_graph(module_level_only=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_operators_never_import_io_recipes_or_the_cli() -> None:
    assert _violations(("fusekit.ops",), ("fusekit.io", "fusekit.recipe", "fusekit.cli")) == []


def test_only_the_cli_imports_the_cli_or_typer() -> None:
    assert _violations(("fusekit",), ("fusekit.cli", "typer"),
                       exempt=("fusekit.cli", "fusekit.__main__")) == []


def test_the_library_never_imports_the_demo_builders() -> None:
    assert _violations(("fusekit",), ("fusekit.demo",), exempt=("fusekit.demo",)) == []


def test_lm_runs_models_and_builds_none() -> None:
    """``fusekit.lm`` loads, scores and generates; training models and tokenizers is the demo's."""
    assert _violations(("fusekit.lm",), ("tokenizers", "fusekit.demo")) == []
    assert not [m for m in MODULES if _in(m, "fusekit.lm") and "expert" in m]


def test_importing_every_library_module_leaves_typer_out() -> None:
    """Every module but ``fusekit.cli*`` (and ``__main__``, which runs it) imports without loading
    typer or ``fusekit.cli``: the library is usable, and fast to import, without the CLI."""
    library = [m for m in MODULES if not _in(m, "fusekit.cli", "fusekit.__main__")]
    code = ("import importlib, sys\n"
            f"for name in {library!r}:\n    importlib.import_module(name)\n"
            "loaded = sorted(m for m in sys.modules\n"
            "                if m == 'typer' or m.split('.')[:2] == ['fusekit', 'cli'])\n"
            "assert not loaded, loaded\n"
            f"assert len([m for m in sys.modules if m.startswith('fusekit')]) >= {len(library)}\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_the_typer_check_can_fail() -> None:
    """The check above sees typer when it is loaded: importing the CLI's app does load it."""
    code = "import sys\nimport fusekit.cli.app\nassert 'typer' in sys.modules\n"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.parametrize(("modules", "torch_expected"), [
    (["fusekit.cli.hub", "fusekit.io.hub", "fusekit.io.lock", "fusekit.recipe"], False),
    (["fusekit.io.writer"], True),  # the check can fail: the tensor writer does need torch
])
def test_push_and_recipe_checks_start_without_torch(modules: list[str], torch_expected: bool) -> None:
    """``fusekit push`` and recipe validation look at files only, so they never wait for torch."""
    code = (f"import importlib, sys\nfor name in {modules!r}:\n    importlib.import_module(name)\n"
            f"assert ('torch' in sys.modules) is {torch_expected}, sorted(sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          cwd=PACKAGE.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]


MAX_FUNCTION_LINES = 60


def long_functions(root: Path, limit: int) -> list[str]:
    """``path:line name (n lines)`` for every function under ``root`` longer than ``limit`` lines,
    counted from ``def`` to its last line, docstring included."""
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = (node.end_lineno or node.lineno) - node.lineno + 1
                if length > limit:
                    where = f"{path.relative_to(root.parent)}:{node.lineno}"
                    found.append(f"{where} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_a_screen() -> None:
    assert long_functions(PACKAGE, MAX_FUNCTION_LINES) == []


def test_the_length_check_can_fail() -> None:
    assert long_functions(PACKAGE, 40)  # several functions are longer than 40 lines
