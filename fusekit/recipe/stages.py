"""Multi-stage recipes: several merge recipes in one YAML file, later ones using earlier ones' outputs.

A file of several YAML documents (separated by ``---``) is a multi-stage recipe, in mergekit-multi's
format: every document is a merge recipe with a ``name:``, and a later stage names an earlier one
wherever a model goes (``model:``, ``base_model:``, a slice source, ``tokenizer_source:``). The last
document may leave ``name`` out (mergekit-multi's unnamed final merge); the last stage is the output.

Stages run in file order, so a stage may use only stages above it: a reference to a later stage, a
cycle, two stages with one name, a nameless stage before the last, a stage name that no stage has and
no folder has, and a document that is not a merge recipe are each one :class:`RecipeError` naming the
file, the line and the stage. Nothing here reads a model; :mod:`fusekit.merging_stages` runs stages.

Example:
    >>> stages = load_stages("configs/multistage.yaml")  # doctest: +SKIP
    >>> [(s.label, s.uses) for s in stages.stages]  # doctest: +SKIP
    [('soup', ()), ('final', ('soup',))]
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusekit.errors import RecipeError
from fusekit.recipe.load import (
    Location,
    RecipeSource,
    format_location,
    parse_yaml_documents,
    read_recipe_text,
    validate,
)
from fusekit.recipe.schema import MergeRecipe

# Keys whose string value names a model (mergekit's model positions; `path` inside {path, revision}).
_MODEL_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source", "path"})
_KEYWORDS = frozenset({"base", "union"})  # tokenizer sources that are not models
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_MARKER = re.compile(r"^(?:---|\.\.\.)(?:\s|$)")


@dataclass(frozen=True)
class Stage:
    """One document of a multi-stage recipe.

    Attributes:
        name: the stage's ``name:`` (None only for an unnamed last document).
        number: the document's position among the stages, from 1.
        recipe: the merge recipe as written (earlier stages still named by their names).
        text: the document's own lines of the file (what its lock hashes and its output copies).
        uses: the earlier stages it reads, in first-mention order.
        data: the parsed YAML, for :meth:`resolve`.
        source: its line marks (counted from the top of the file).
    """

    name: str | None
    number: int
    recipe: MergeRecipe
    text: str
    uses: tuple[str, ...]
    data: dict[str, Any]
    source: RecipeSource

    @property
    def label(self) -> str:
        """The name, or ``final`` for an unnamed last document."""
        return self.name or "final"

    @property
    def line(self) -> int:
        """The line the document starts on."""
        return self.source.marks.get((), (1, 1))[0]

    def resolve(self, folders: Mapping[str, Path]) -> MergeRecipe:
        """The recipe with every earlier stage's name replaced by its output folder (absolute)."""
        data = _map_refs(self.data, lambda ref: str(folders[ref].absolute()) if ref in folders else ref)
        return validate(MergeRecipe, data, self.source, _merge_checks())


@dataclass(frozen=True)
class StageRecipe:
    """One stage ready to merge (what :func:`fusekit.merge` takes for a stage).

    Attributes:
        name: the stage's label.
        recipe: the recipe with earlier stages replaced by their output folders.
        text: the document's text: hashed into the stage's lock and copied beside its output.
        file: the multi-stage recipe file.
    """

    name: str
    recipe: MergeRecipe
    text: str
    file: Path


@dataclass(frozen=True)
class Stages:
    """The stages of one multi-stage recipe file, in file order (which is also the build order)."""

    file: Path
    stages: tuple[Stage, ...]

    @property
    def final(self) -> Stage:
        """The last stage: the output."""
        return self.stages[-1]

    def get(self, name: str) -> Stage:
        """The stage called ``name``; a one-line error listing the stages when there is none."""
        for stage in self.stages:
            if stage.label == name:
                return stage
        labels = [s.label for s in self.stages]
        raise RecipeError(f"--stage '{name}': {self.file} has no stage of that name{_close(name, labels)}; "
                          f"its stages are: {', '.join(labels)}")

    def needed(self, name: str) -> list[Stage]:
        """Stage ``name`` and every stage it reads, directly or not, in build order."""
        wanted = {name}
        for stage in reversed(self.stages):
            if stage.label in wanted:
                wanted.update(stage.uses)
        return [s for s in self.stages if s.label in wanted]

    def graph(self) -> list[dict[str, Any]]:
        """One row per stage in build order: name, line, the stages it uses, whether it is the output."""
        return [{"name": s.label, "line": s.line, "uses": list(s.uses), "output": s is self.final}
                for s in self.stages]

    def describe(self) -> str:
        """The stage graph as text: one line per stage, in build order."""
        width = max(len(s.label) for s in self.stages)
        lines = [f"{len(self.stages)} stages, built in this order:"]
        for number, stage in enumerate(self.stages, 1):
            uses = ", ".join(stage.uses) or "-"
            note = "  → the output" if stage is self.final else ""
            lines.append(f"  {number}. {stage.label:<{width}}  line {stage.line:<4} uses: {uses}{note}")
        return "\n".join(lines)

    def recipe_for(self, stage: Stage, folders: Mapping[str, Path]) -> StageRecipe:
        """``stage`` ready to merge, reading earlier stages from ``folders`` (stage name → folder)."""
        return StageRecipe(stage.label, stage.resolve(folders), stage.text, self.file)


def is_multistage(path: str | Path) -> bool:
    """Whether ``path`` is a readable YAML file of more than one document (unreadable or malformed
    files answer False, so the one-recipe loader reports their problem)."""
    try:
        return len(parse_yaml_documents(read_recipe_text(Path(path)), str(path))) > 1
    except RecipeError:
        return False


def load_stages(path: str | Path) -> Stages:
    """Read, parse and check a multi-stage recipe file.

    Args:
        path: the YAML file (several documents, each a merge recipe with a ``name``).

    Returns:
        The :class:`Stages`, in file order.

    Raises:
        RecipeError: one line naming the file, line and stage (see the module docstring).
    """
    path = Path(path)
    return parse_stages(read_recipe_text(path), str(path), file=path)


def parse_stages(text: str, name: str, *, file: Path | None = None) -> Stages:
    """Like :func:`load_stages` for YAML text held in memory (``name`` is what errors call it)."""
    documents = parse_yaml_documents(text, name)
    if not documents:
        raise RecipeError(f"{name}: the recipe is empty; see configs/ for examples")
    names = _stage_names(documents)
    later = {n: i for i, n in enumerate(names) if n is not None}
    stages = []
    for number, ((data, source), stage_name) in enumerate(zip(documents, names, strict=True), 1):
        uses = _references(data, source, stage_name, later)
        recipe = _validate(data, source, stage_name or "final")
        stages.append(Stage(stage_name, number, recipe, _document_text(text, source), uses, data, source))
    _refuse_cycles(stages)
    for stage in stages:
        _refuse_later(stage, later)
    return Stages(file or Path(name), tuple(stages))


def _stage_names(documents: list[tuple[Any, RecipeSource]]) -> list[str | None]:
    """Each document's ``name``, checked: documents are mappings, names unique, usable as folder names,
    and present on every document but the last."""
    names: list[str | None] = []
    seen: dict[str, int] = {}
    for number, (data, source) in enumerate(documents, 1):
        where = source.where(())
        if not isinstance(data, dict):
            raise RecipeError(f"{where} document {number} is not a merge recipe (a {type(data).__name__}); "
                              "each document of a multi-stage recipe is a mapping with merge_method")
        name = data.get("name")
        at = source.where(("name",))
        if name is None and number < len(documents):
            raise RecipeError(f"{where} document {number} has no 'name'; in a multi-stage recipe every "
                              "stage but the last needs one, so later stages can use its output")
        if name is not None and (not isinstance(name, str) or not _NAME.match(name) or name in _KEYWORDS):
            raise RecipeError(f"{at} name: stage name {name!r} must be 1-100 letters, digits, '.', '_' or "
                              "'-' (it names a folder), and not 'base' or 'union'")
        if name is not None and name in seen:
            raise RecipeError(f"{at} name: stage '{name}' is already the name of the stage on line "
                              f"{seen[name]}; give each stage its own name")
        if name is not None:
            seen[name] = source.marks.get((), (1, 1))[0]
        names.append(name)
    if names[-1] is None and "final" in seen:
        raise RecipeError(f"{documents[-1][1].where(())} the last stage has no 'name', so it is called "
                          f"'final', and so is the stage on line {seen['final']}; name the last stage")
    return names


def _validate(data: dict[str, Any], source: RecipeSource, label: str) -> MergeRecipe:
    """The document as a merge recipe; errors name the stage too."""
    if "merge_method" not in data:
        kind = "an MoE recipe (build it with `fusekit moe`)" if "experts" in data else "not a merge recipe"
        raise RecipeError(f"{source.where(())} stage '{label}' is {kind}: it has no merge_method; every "
                          "stage of a multi-stage recipe is a merge recipe")
    try:
        return validate(MergeRecipe, data, source, _merge_checks())
    except RecipeError as exc:
        raise RecipeError(f"{exc} (in stage '{label}')") from None


def _merge_checks() -> Callable[[MergeRecipe], list[tuple[Location, str]]]:
    from fusekit.recipe.checks import check_merge_recipe

    return check_merge_recipe


def _map_refs(node: Any, change: Callable[[str], str], loc: Location = (),
              found: list[tuple[Location, str]] | None = None) -> Any:
    """A copy of ``node`` with ``change`` applied to every model reference string (``parameters``
    are left alone); ``found`` collects (location, reference) as they are met."""
    if isinstance(node, dict):
        result = {}
        for key, value in node.items():
            if key in _MODEL_KEYS and isinstance(value, str):
                if found is not None:
                    found.append(((*loc, key), value))
                result[key] = change(value)
            else:
                result[key] = value if key == "parameters" else _map_refs(value, change, (*loc, key), found)
        return result
    if isinstance(node, list):
        return [_map_refs(item, change, (*loc, i), found) for i, item in enumerate(node)]
    return node


def _references(data: dict[str, Any], source: RecipeSource, name: str | None,
                stages: Mapping[str, int]) -> tuple[str, ...]:
    """The stage names ``data`` uses as models (any stage, checked for order later); a bare name that
    is neither a stage nor a folder is refused here, before any stage runs."""
    found: list[tuple[Location, str]] = []
    _map_refs(data, lambda ref: ref, (), found)
    uses: list[str] = []
    for loc, ref in found:
        if ref in stages:
            uses.append(ref)
        elif _looks_like_a_stage(ref):
            known = ", ".join(stages) or "none"
            raise RecipeError(f"{source.where(loc)} {format_location(loc)}: '{ref}' is neither a stage of "
                              f"this file (stages: {known}) nor a model folder; fix the name"
                              f"{_close(ref, list(stages))} (in stage '{name or 'final'}')")
    return tuple(dict.fromkeys(uses))


def _looks_like_a_stage(ref: str) -> bool:
    """A bare word that names no folder: no Hub id (``org/name``), path or keyword can look so."""
    if ref in _KEYWORDS or any(c in ref for c in "/\\:@~") or ref.endswith(".safetensors"):
        return False
    try:
        return not Path(ref).exists()
    except OSError:
        return False


def _refuse_cycles(stages: list[Stage]) -> None:
    """A cycle of stages (a stage using itself, or stages using each other) is one error naming it."""
    uses = {s.label: s.uses for s in stages}
    for stage in stages:
        path = _cycle_from(stage.label, uses, [])
        if path:
            at = stage.source.where(())
            raise RecipeError(f"{at} stages form a cycle: {' → '.join(path)}; a stage can only use the "
                              f"output of stages above it (in stage '{stage.label}')")


def _cycle_from(name: str, uses: Mapping[str, tuple[str, ...]], path: list[str]) -> list[str]:
    """The cycle through ``name`` reachable by following ``uses``, as names ending where it began."""
    if name in path:
        return [*path[path.index(name):], name]
    for used in uses.get(name, ()):
        found = _cycle_from(used, uses, [*path, name])
        if found:
            return found
    return []


def _refuse_later(stage: Stage, order: Mapping[str, int]) -> None:
    """A stage may use only stages above it in the file (they are built first)."""
    found: list[tuple[Location, str]] = []
    _map_refs(stage.data, lambda ref: ref, (), found)
    for loc, ref in found:
        if ref in order and order[ref] >= stage.number - 1:
            raise RecipeError(f"{stage.source.where(loc)} {format_location(loc)}: stage '{ref}' comes later "
                              f"in the file (document {order[ref] + 1}); stages are built top to bottom, "
                              f"so move '{ref}' above '{stage.label}'")


def _document_text(text: str, source: RecipeSource) -> str:
    """The lines of ``text`` holding the document that ``source`` marks (between ``---`` lines)."""
    lines = text.splitlines(keepends=True)
    first = source.marks.get((), (1, 1))[0] - 1
    start = first
    while start > 0 and not _MARKER.match(lines[start - 1]):
        start -= 1
    end = first + 1
    while end < len(lines) and not _MARKER.match(lines[end]):
        end += 1
    return "".join(lines[start:end])


def _close(word: str, names: list[str]) -> str:
    """``; did you mean 'x'?`` for a close stage name, else nothing."""
    close = difflib.get_close_matches(word, names, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""
