"""Read a tune recipe: a merge (or ensemble) recipe with search spaces and a ``tune:`` block.

::

    merge_method: {search: [linear, ties, dare_ties]}
    base_model: demo-out/experts/base
    models:
      - model: demo-out/experts/python
        parameters: {weight: {search: [0, 1]}}
      - model: demo-out/experts/c
        parameters: {weight: {search: [0, 1], groups: 2}}
    tune:
      data: demo-out/experts/heldout/python.txt     # a file or a list; .jsonl rows or plain text
      test: demo-out/experts/heldout/mixed.txt      # reported, never optimised
      optimizer: cma                                # cma | random | grid | adam
      budget: {evaluations: 40, time: 30m}          # at least one of them
      seed: 0

Every problem is reported at once, one line each as ``recipe.yaml:12:5 key: message``; nothing here
reads the models or the data (:func:`check_data_files` does, when the search starts), and nothing
imports torch: ``fusekit validate`` checks a tune recipe in a fraction of a second.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fusekit.errors import FusekitError, RecipeError
from fusekit.recipe.kind import recipe_kind
from fusekit.recipe.load import (
    RecipeSource,
    parse_yaml,
    raise_problems,
    read_recipe_text,
    short_repr,
    validate,
)
from fusekit.recipe.numbers import Seed, is_number
from fusekit.tune.space import (
    GRADIENT_METHODS,
    GRADIENT_PARAMETERS,
    METHODS,
    Dimension,
    Location,
    Problem,
    SearchSpace,
    parse_spaces,
)

OptimizerName = Literal["cma", "random", "grid", "adam"]
DEFAULT_SIGMA = 0.3
DEFAULT_LEARNING_RATE = 0.05
MAX_WORKERS = 4096
_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True)
class TuneSettings:
    """The ``tune:`` block, checked.

    Attributes:
        data: the files scored for every candidate (absolute paths; ``.jsonl`` rows or plain text).
        test: files scored for the report only (never optimised).
        optimizer: ``cma``, ``random``, ``grid`` or ``adam``.
        evaluations / wall_time_s: the budget; at least one is set, each at least 1.
        seed: seeds the optimiser (and the candidates' stochastic merges).
        workers: candidates evaluated at once (1: in-process, more: Ray).
        population: candidates per generation (None: CMA-ES's default for the dimension).
        sigma: CMA-ES's initial step in the unit cube.
        learning_rate: the ``adam`` optimiser's step size.
        per_layer: ``adam`` learns one coefficient per model and layer (AdaMerging) instead of one
            per model.
    """

    data: tuple[str, ...]
    test: tuple[str, ...]
    optimizer: OptimizerName
    evaluations: int | None
    wall_time_s: float | None
    seed: int
    workers: int
    population: int | None
    sigma: float
    learning_rate: float
    per_layer: bool


@dataclass(frozen=True)
class TuneSpec:
    """A loaded tune recipe.

    Attributes:
        kind: ``merge`` or ``ensemble``.
        path: the recipe file.
        text: its text (hashed into checkpoints, so a resume notices an edited recipe).
        space: the search space; :meth:`SearchSpace.recipe_for` gives a candidate's plain recipe.
        settings: the ``tune:`` block.
        base_recipe: the recipe without ``tune:``, search spaces left in (for the report).
    """

    kind: Literal["merge", "ensemble"]
    path: Path
    text: str
    space: SearchSpace
    settings: TuneSettings
    base_recipe: dict[str, Any]


# -- the tune: block ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def parse_duration(value: Any) -> float:
    """Seconds in a duration: a number of seconds, or text such as ``90s``, ``30m``, ``1h30m``, ``2d``.

    Raises:
        ValueError: not a duration, or shorter than 1 second.

    Example:
        >>> parse_duration("1h30m"), parse_duration(45)
        (5400.0, 45.0)
    """
    if is_number(value):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\s*(\d+(\.\d+)?\s*[smhd]?\s*)+", value):
        parts = re.findall(r"(\d+(?:\.\d+)?)\s*([smhd]?)", value)
        seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    else:
        raise ValueError(f"must be seconds or a duration such as 90s, 30m, 1h30m, got {short_repr(value)}")
    if not math.isfinite(seconds) or seconds < 1:
        raise ValueError(f"must be at least 1 second, got {short_repr(value)}; raise it")
    return seconds


class Budget(_Strict):
    """``budget:``: how many candidates may be evaluated, and for how long."""

    evaluations: int | None = Field(default=None, strict=True)
    time: float | str | None = None

    @field_validator("evaluations")
    @classmethod
    def _positive(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise ValueError(f"must be at least 1, got {value}; give the number of candidates to evaluate")
        return value

    @field_validator("time")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return None if value is None else parse_duration(value)

    @model_validator(mode="after")
    def _some(self) -> Budget:
        if self.evaluations is None and self.time is None:
            raise ValueError("give evaluations (a number of candidates), time (e.g. 30m) or both")
        return self


def _files(value: Any) -> Any:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"must be a file or a list of files (.jsonl or text), got {short_repr(value)}")
    return value


class TuneBlock(_Strict):
    """The ``tune:`` block as written (see :class:`TuneSettings` for the meaning of each key)."""

    data: list[str]
    test: list[str] | None = None
    optimizer: OptimizerName = "cma"
    budget: Budget
    seed: Seed = Field(default=0, strict=True)
    workers: int = Field(default=1, ge=1, le=MAX_WORKERS, strict=True)
    population: int | None = Field(default=None, ge=2, le=100_000, strict=True)
    sigma: float = Field(default=DEFAULT_SIGMA, gt=0, le=1)
    learning_rate: float = Field(default=DEFAULT_LEARNING_RATE, gt=0, allow_inf_nan=False)
    per_layer: bool = False

    _data = field_validator("data", "test", mode="before")(_files)


class _TuneOnly(_Strict):
    tune: TuneBlock


# -- loading ------------------------------------------------------------------------------------------


def load_tune_spec(path: str | Path) -> TuneSpec:
    """Read and check a tune recipe file.

    Args:
        path: the YAML recipe (a merge or ensemble recipe with a ``tune:`` block).

    Returns:
        The spec: its search space, settings and texts.

    Raises:
        RecipeError: every problem found, one line each as ``file:line:col key: message``.

    Example:
        >>> spec = load_tune_spec("configs/tune/merge-cma.yaml")  # doctest: +SKIP
        >>> spec.space.recipe_for(spec.space.default_point())["merge_method"]  # doctest: +SKIP
    """
    path = Path(path)
    return parse_tune_spec(read_recipe_text(path), str(path), path=path)


def parse_tune_spec(text: str, name: str = "<recipe>", *, path: Path | None = None) -> TuneSpec:
    """Like :func:`load_tune_spec` for YAML text held in memory.

    Args:
        text: the YAML text.
        name: what messages call it.
        path: the file it came from (``Path(name)`` when not given).

    Returns:
        The spec.

    Raises:
        RecipeError: as :func:`load_tune_spec`.
    """
    data, source = parse_yaml(text, name)
    if "tune" not in data:
        raise RecipeError(f"{name}:1:1 there is no tune: block; add one with data, optimizer and budget "
                          "(see configs/tune/) to search this recipe with fusekit tune")
    kind = _kind(data, source)
    block = validate(_TuneOnly, {"tune": data["tune"]}, source).tune
    methods = _methods(data)
    space, problems = parse_spaces(data, kind, methods)
    if not problems:
        problems = _checks(data, kind, space, block, methods)
    raise_problems(problems, source)
    _check_candidates(space, source)
    return TuneSpec(kind, path or Path(name), text, space, _settings(block), dict(space.template))


def _kind(data: dict[str, Any], source: RecipeSource) -> Literal["merge", "ensemble"]:
    plain = {k: v for k, v in data.items() if k != "tune"}
    kind = recipe_kind(plain)
    if "merge_method" in plain or (kind is not None and kind.name == "merge"):
        return "merge"
    if kind is not None and kind.name == "ensemble":
        return "ensemble"
    what = f"{kind.label}" if kind is not None else "a recipe of unknown kind"
    raise RecipeError(f"{source.where(('tune',))} tune: applies to merge and ensemble recipes, and this is "
                      f"{what}; put the tune: block in a merge recipe (merge_method, models) or an "
                      "ensemble recipe (method, models)")


def _methods(data: dict[str, Any]) -> list[str]:
    """The merge methods a candidate may use: the searched ones, or the one given."""
    method = data.get("merge_method")
    if isinstance(method, dict) and isinstance(method.get("search"), list):
        return [m for m in method["search"] if isinstance(m, str)]
    return [method] if isinstance(method, str) else []


# -- checks across keys -------------------------------------------------------------------------------


def _checks(data: dict[str, Any], kind: str, space: SearchSpace, block: TuneBlock,
            methods: list[str]) -> list[Problem]:
    """Problems no single key shows: method conflicts, the base, what each optimiser can search."""
    problems: list[Problem] = []
    if not space.dims:
        problems.append(((), "there is nothing to search; write a search space such as "
                             "'weight: {search: [0, 1]}' in a model's parameters"))
    if kind == "merge":
        problems += _method_problems(data, methods)
        problems += _optimizer_problems(data, space, block, methods)
        if any(m in ("della", "della_linear") for m in methods):
            problems += _della_problems(data)
    if block.per_layer and block.optimizer != "adam":
        problems.append((("tune", "per_layer"), f"per_layer applies to optimizer adam only (this search "
                         f"uses {block.optimizer}); remove it, or use groups: N in a search space"))
    if block.optimizer == "grid" and kind == "merge" and space.dims:
        problems += _grid_problems(space, block)
    return problems


def _method_problems(data: dict[str, Any], methods: list[str]) -> list[Problem]:
    from fusekit.recipe.load import suggest

    searched = isinstance(data.get("merge_method"), dict)
    method = data.get("merge_method")
    if not searched and isinstance(method, str) and method not in METHODS:
        hint = suggest(method, METHODS).replace("valid keys", "valid methods")
        return [(("merge_method",), f"unknown merge method '{method}'{hint}")]
    problems: list[Problem] = []
    needing = [m for m in methods if m in METHODS and METHODS[m].base == "required"]
    if needing and not _has_base(data):
        names = " and ".join(needing) + (" (searched)" if searched else "")
        drop = f", or drop {' and '.join(needing)} from merge_method.search" if searched else ""
        problems.append((("merge_method",), f"{names} need{'s' if len(needing) == 1 else ''} a base model; "
                         f"add 'base_model: <the model the others were fine-tuned from>'{drop}"))
    if searched:
        problems += _conflicts(data, [m for m in methods if m in METHODS])
    return problems


def _has_base(data: dict[str, Any]) -> bool:
    slices = data.get("slices")
    if data.get("base_model"):
        return True
    return isinstance(slices, list) and bool(slices) and all(isinstance(s, dict) and s.get("base_model")
                                                             for s in slices)


def _conflicts(data: dict[str, Any], methods: list[str]) -> list[Problem]:
    """A parameter given (not searched) that one of the searched methods does not take."""
    problems: list[Problem] = []
    for loc, table in _parameter_tables({k: v for k, v in data.items() if k != "tune"}):
        for name, value in table.items():
            if isinstance(value, dict) and "search" in value:
                continue  # a searched parameter is checked with its space
            missing = next((m for m in methods if name not in METHODS[m].params), None)
            if missing is not None:
                problems.append(((*loc, str(name)), f"'{name}' is not a parameter of {missing}, one of the "
                                 f"searched methods; remove it here or drop {missing} from "
                                 "merge_method.search"))
    return problems


def _parameter_tables(data: Any, loc: Location = ()) -> list[tuple[Location, dict[str, Any]]]:
    """Every ``parameters:`` mapping in the recipe's data, with its location."""
    found: list[tuple[Location, dict[str, Any]]] = []
    if isinstance(data, dict):
        for key, value in data.items():
            if key == "parameters" and isinstance(value, dict):
                found.append(((*loc, key), value))
            else:
                found += _parameter_tables(value, (*loc, key))
    elif isinstance(data, list):
        for i, value in enumerate(data):
            found += _parameter_tables(value, (*loc, i))
    return found


DELLA_EPSILON = 0.15
"""DELLA's default ``epsilon`` (fusekit.ops.task_vectors.DellaModelParams)."""


def _della_problems(data: dict[str, Any]) -> list[Problem]:
    """DELLA needs ``density ± epsilon`` inside (0, 1) (where density is inside it): a search whose
    candidates would cross that bound is refused now rather than failing mid-search."""
    top = _table(data)
    problems: list[Problem] = []
    for i, entry in enumerate(data.get("models") or []):
        table = _table(entry)
        density = _span(table.get("density", top.get("density", 1.0)))
        epsilon = _span(table.get("epsilon", top.get("epsilon", DELLA_EPSILON)))
        if density is None or epsilon is None or density[0] >= 1 or density[1] <= 0 or epsilon[1] <= 0:
            continue
        if min(density[1], 1.0) + epsilon[1] >= 1 or max(density[0], 0.0) - epsilon[1] <= 0:
            where = ("models", i, "parameters", "density" if "density" in table else "epsilon")
            problems.append((where if where[-1] in table else ("models", i), (
                f"della needs density ± epsilon inside (0, 1), and density in [{density[0]:g}, "
                f"{density[1]:g}] with epsilon up to {epsilon[1]:g} leaves it for some candidates; keep "
                f"density within [{epsilon[1]:g}, {1 - epsilon[1]:g}] (exclusive) or lower epsilon")))
    return problems


def _table(holder: Any) -> dict[str, Any]:
    """``holder``'s ``parameters:`` mapping, or an empty one."""
    table = holder.get("parameters") if isinstance(holder, dict) else None
    return table if isinstance(table, dict) else {}


def _span(value: Any) -> tuple[float, float] | None:
    """The lowest and highest value a number or a (valid) search space takes; None for others."""
    if is_number(value):
        return float(value), float(value)
    bounds = value.get("search") if isinstance(value, dict) else None
    if isinstance(bounds, list) and len(bounds) == 2 and all(is_number(b) for b in bounds):
        return float(bounds[0]), float(bounds[1])
    return None


def _optimizer_problems(data: dict[str, Any], space: SearchSpace, block: TuneBlock,
                        methods: list[str]) -> list[Problem]:
    """What the ``adam`` optimiser cannot search: a method search, a method without gradients, and
    parameters other than the coefficients (weight, lambda)."""
    from fusekit.tune.space import parameter_name

    if block.optimizer != "adam":
        return []
    if isinstance(data.get("merge_method"), dict):
        return [(("merge_method",), "optimizer adam cannot search merge_method; fix the method (one of "
                 f"{', '.join(GRADIENT_METHODS)}) or use optimizer cma, random or grid")]
    if methods and methods[0] not in GRADIENT_METHODS:
        return [(("tune", "optimizer"), f"optimizer adam needs merged weights that are differentiable in "
                 f"the coefficients, which {methods[0]} does not give; use one of "
                 f"{', '.join(GRADIENT_METHODS)}, or optimizer cma, random or grid")]
    problems: list[Problem] = []
    for dim in space.dims:
        name = parameter_name(dim.location())
        if name not in GRADIENT_PARAMETERS and dim.group in (None, 0):
            problems.append((dim.location(), f"optimizer adam learns {' and '.join(GRADIENT_PARAMETERS)} "
                             f"only (the masks of TIES and DARE stay fixed); give {name} a value, or use "
                             "optimizer cma, random or grid"))
    return problems


def _grid_problems(space: SearchSpace, block: TuneBlock) -> list[Problem]:
    from fusekit.tune.optimizers import grid_sizes

    evaluations = block.budget.evaluations
    if evaluations is None:
        return [(("tune", "budget"), "optimizer grid needs budget.evaluations (the grid is sized to it)")]
    try:
        grid_sizes(space.dims, evaluations)
    except ValueError as exc:
        return [(("tune", "budget", "evaluations"), str(exc))]
    return []


def _check_candidates(space: SearchSpace, source: RecipeSource) -> None:
    """Validate the plain recipe of the default point (under each searched method) with the schema of
    its kind, so that a mistake outside the search spaces is found now, not at the first merge."""
    from fusekit.ensemble.recipe import EnsembleRecipe, check_ensemble_recipe
    from fusekit.recipe.schema import MergeRecipe

    point = space.default_point()
    variants = [point]
    for i, dim in enumerate(space.dims):
        if dim.choices is not None:
            variants = [[*point[:i], dim.unit(choice), *point[i + 1:]] for choice in dim.choices]
    for variant in variants:
        recipe = space.recipe_for(variant)
        if space.kind == "ensemble":
            validate(EnsembleRecipe, recipe, source, check_ensemble_recipe)
        else:
            validate(MergeRecipe, recipe, source)


def _settings(block: TuneBlock) -> TuneSettings:
    budget = block.budget
    return TuneSettings(
        data=tuple(_absolute(p) for p in block.data), test=tuple(_absolute(p) for p in block.test or []),
        optimizer=block.optimizer, evaluations=budget.evaluations,
        wall_time_s=float(budget.time) if budget.time is not None else None, seed=block.seed,
        workers=block.workers, population=block.population, sigma=block.sigma,
        learning_rate=block.learning_rate, per_layer=block.per_layer)


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path))


# -- the data files -----------------------------------------------------------------------------------


def check_data_files(settings: TuneSettings) -> None:
    """Refuse a missing, unreadable or empty ``tune: data`` or ``test`` file before the search starts.

    ``.jsonl`` files are read as router data is (each row a ``text``, or a ``prompt`` and its
    ``completion``); other files must be non-empty text.

    Raises:
        FusekitError: one line naming the key and the file, and what to do.
    """
    from fusekit.select.data import read_data_texts

    for key, paths in (("data", settings.data), ("test", settings.test)):
        for path in paths:
            try:
                read_data_texts(path, completions=True, option=None)
            except FusekitError as exc:
                raise FusekitError(f"tune.{key}: {exc}") from None


def is_tune_recipe(path: str | Path) -> bool:
    """Whether the file at ``path`` is one YAML mapping with a ``tune:`` block (read by ``fusekit tune``).

    Returns False when it cannot be read or parsed (the command's own loader then says why).
    """
    from fusekit.recipe.load import parse_yaml_documents

    try:
        documents = parse_yaml_documents(read_recipe_text(Path(path)), str(path))
    except RecipeError:
        return False
    return len(documents) == 1 and isinstance(documents[0][0], dict) and "tune" in documents[0][0]


__all__ = ["Budget", "Dimension", "TuneBlock", "TuneSettings", "TuneSpec", "check_data_files",
           "is_tune_recipe", "load_tune_spec", "parse_duration", "parse_tune_spec"]
