"""Which command a recipe is for, told from its top-level keys before any schema is applied.

fusekit reads four kinds of recipe: merge (``fusekit merge`` / ``plan``; several ``---`` documents make
a multi-stage merge), MoE (``fusekit moe``), ensemble (``fusekit ensemble``) and router (``fusekit route
build``), plus the serve config (``fusekit serve``). Each kind has keys no other kind has; a recipe
showing the keys of exactly one kind is that kind. When a command's loader meets a recipe of another
kind, :func:`other_kind_error` turns what would be a list of unknown and missing keys into one line
naming the command the recipe is for.

Nothing here imports torch, pydantic models or YAML: it looks at a parsed mapping's keys.

Example:
    >>> recipe_kind({"base_model": "a", "experts": [{"source_model": "b"}]}).name
    'moe'
    >>> recipe_kind({"models": [{"model": "a"}], "method": "prob_avg"}).command("ens.yaml")
    'fusekit ensemble score ens.yaml --text FILE (or generate, check)'
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

KindName = Literal["merge", "moe", "ensemble", "route", "serve"]

SIGNATURES: dict[KindName, tuple[str, ...]] = {
    "merge": ("merge_method", "slices", "modules"),
    "moe": ("experts", "gate_mode", "experts_per_token", "shared_experts"),
    "ensemble": ("method", "primary", "generation"),
    "route": ("data", "labels", "features", "router", "calibrate", "threshold", "folds", "fold_block"),
    "serve": ("limits", "host", "port"),
}
"""Top-level keys that only recipes of one kind have (``models``, ``dtype``, ``base_model`` are shared)."""

_LABELS: dict[KindName, str] = {"merge": "a merge recipe", "moe": "an MoE recipe",
                                "ensemble": "an ensemble recipe", "route": "a router recipe",
                                "serve": "a serve config"}
_COMMANDS: dict[KindName, str] = {
    "merge": "fusekit merge {path} OUT_DIR (or fusekit plan {path})",
    "moe": "fusekit moe {path} OUT_DIR (or fusekit plan {path})",
    "ensemble": "fusekit ensemble score {path} --text FILE (or generate, check)",
    "route": "fusekit route build {path} OUT_DIR",
    "serve": "fusekit serve {path}",
}


@dataclass(frozen=True)
class RecipeKind:
    """What a recipe is, and the keys that say so.

    Attributes:
        name: ``merge``, ``moe``, ``ensemble`` or ``route``.
        keys: the recipe's keys that only this kind has, in file order; empty when the kind is only
            a guess (``models`` without ``merge_method`` reads as an ensemble).
        stages: the number of YAML documents (more than one: a multi-stage merge).
    """

    name: KindName
    keys: tuple[str, ...]
    stages: int = 1

    @property
    def label(self) -> str:
        """``an MoE recipe``, ``a multi-stage merge recipe``, ...: how messages name the kind."""
        return "a multi-stage merge recipe" if self.stages > 1 else _LABELS[self.name]

    def command(self, path: str | Path) -> str:
        """The command line that reads a recipe of this kind at ``path``."""
        return _COMMANDS[self.name].format(path=path)


def recipe_kind(data: Any) -> RecipeKind | None:
    """The kind of one parsed recipe document, from its top-level keys.

    ``merge_method`` makes a merge recipe whatever else is there (mergekit's own rule). Otherwise the
    recipe is the one kind whose :data:`SIGNATURES` keys it has; with none of them, ``models`` alone
    reads as an ensemble (a merge recipe without its method); with keys of two kinds it is ambiguous.

    Args:
        data: the parsed YAML document.

    Returns:
        The kind, or None when ``data`` is not a mapping, is ambiguous or has no telling key.
    """
    if not isinstance(data, Mapping):
        return None
    if "merge_method" in data:
        return RecipeKind("merge", ("merge_method",))
    found = {kind: tuple(k for k in data if k in keys) for kind, keys in SIGNATURES.items()}
    found = {kind: keys for kind, keys in found.items() if keys}
    if len(found) == 1:
        (kind, keys), = found.items()
        return RecipeKind(kind, keys)
    if not found and "models" in data:
        return RecipeKind("ensemble", ())
    return None


def kind_of_fields(fields: Collection[str]) -> KindName | None:
    """The kind a schema with these top-level ``fields`` reads (the one whose signature it takes)."""
    kinds = [kind for kind, keys in SIGNATURES.items() if set(keys) & set(fields)]
    return kinds[0] if len(kinds) == 1 else None


def other_kind_error(data: Any, fields: Collection[str],
                     path: str) -> tuple[tuple[str | int, ...], str] | None:
    """Where and why ``data`` is for another command than the one whose schema takes ``fields``.

    Args:
        data: the parsed recipe.
        fields: the top-level keys the command's schema takes.
        path: the recipe's name in messages (its file).

    Returns:
        The location of the first telling key and ``"this is an MoE recipe (it has experts,
        gate_mode), not a merge recipe; run: fusekit moe ..."`` when ``data`` shows keys of another
        kind that the schema does not take; None otherwise (the schema's own checks then report).
    """
    tuning = tune_error(data, fields, path)
    if tuning is not None:
        return tuning
    kind = recipe_kind(data)
    if kind is None or not kind.keys or set(kind.keys) <= set(fields):
        return None
    expected = kind_of_fields(fields)
    wanted = f", not {_LABELS[expected]}" if expected is not None else ""
    keys = ", ".join(kind.keys[:3])
    hint = ("; to ensemble its models instead, replace merge_method with method: prob_avg (the models: "
            "entries stay as they are)" if (kind.name, expected) == ("merge", "ensemble") else "")
    return (kind.keys[0],), f"this is {kind.label} (it has {keys}){wanted}; run: {kind.command(path)}{hint}"


def file_kind(path: str | Path) -> RecipeKind | None:
    """The kind of the recipe file at ``path`` (several documents: a multi-stage merge).

    Args:
        path: a YAML recipe file.

    Returns:
        The kind, or None when the file cannot be read or parsed, or its kind cannot be told.
    """
    from fusekit.errors import RecipeError
    from fusekit.recipe.load import parse_yaml_documents, read_recipe_text

    try:
        documents = parse_yaml_documents(read_recipe_text(Path(path)), str(path))
    except RecipeError:
        return None
    if len(documents) > 1:
        return RecipeKind("merge", (), stages=len(documents))
    return recipe_kind(documents[0][0]) if documents else None


def search_space_locations(data: Any, loc: tuple[str | int, ...] = ()) -> list[tuple[str | int, ...]]:
    """Where ``data`` holds a search space (a mapping with a ``search`` key, read by ``fusekit tune``),
    in document order; the spaces' own contents are not searched."""
    if isinstance(data, Mapping):
        if "search" in data and loc:
            return [loc]
        return [found for key, value in data.items() for found in search_space_locations(value, (*loc, key))]
    if isinstance(data, list):
        return [found for i, value in enumerate(data) for found in search_space_locations(value, (*loc, i))]
    return []


def tune_error(data: Any, fields: Collection[str], path: str) -> tuple[tuple[str | int, ...], str] | None:
    """Where and why ``data`` is a tune recipe (a ``tune:`` block or a search space) given to a command
    whose schema (``fields``) reads plain recipes; None when it is not one."""
    if not isinstance(data, Mapping) or "tune" in fields:
        return None
    run = (f"run: fusekit tune {path} OUT_DIR first; it writes OUT_DIR/best.yaml, a plain recipe this "
           "command reads")
    if "tune" in data:
        return ("tune",), f"this is a tune recipe (it has a tune: block); {run}"
    found = search_space_locations({k: v for k, v in data.items() if k != "tune"})
    if found:
        label = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in found[0]).lstrip(".")
        return found[0], (f"{label}: a search space ({{search: ...}}) is read only by fusekit tune; write a "
                          f"value here, or add a tune: block and {run}")
    return None
