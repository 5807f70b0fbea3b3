"""Search spaces: the numbers of a recipe that ``fusekit tune`` chooses, and the unit cube they map from.

A merge recipe may write any numeric parameter as a search space instead of a value, and the merge
method as a choice among methods::

    merge_method: {search: [linear, ties, dare_ties]}
    models:
      - model: a
        parameters:
          weight: {search: [0, 1]}                     # linear between the bounds
          density: {search: [0.1, 1], scale: log}      # log-uniform
      - model: b
        parameters:
          weight: {search: [0, 1], groups: 4}          # a gradient of 4 knots across the layers

Every optimiser works in the unit cube ``[0, 1]^d``: dimension ``i`` maps ``x_i`` to
``low + x_i (high − low)`` (``exp`` of that in log space for ``scale: log``), a choice to the
``floor(x_i · k)``-th of its ``k`` methods, and a space of ``groups: G`` is ``G`` dimensions whose
values form the gradient list ``[v1, ..., vG]``. :meth:`SearchSpace.recipe_for` turns a point into a
plain recipe (values rounded to 6 significant digits), which is what a candidate merges and what
``best.yaml`` holds.

The valid range of each numeric parameter is in :data:`METHODS`, a table of what the merge
operators' parameter models accept (``tests/test_tune_spec.py`` checks that it agrees with them), so
that a recipe is validated without importing torch.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

Location = tuple[str | int, ...]
Scale = Literal["linear", "log"]
INF = math.inf
SIGNIFICANT_DIGITS = 6


@dataclass(frozen=True)
class ParamRange:
    """The values a numeric parameter accepts: ``low``..``high``, each end open or closed."""

    low: float = -INF
    high: float = INF
    low_open: bool = False
    high_open: bool = False

    def contains(self, value: float) -> bool:
        """Whether ``value`` is inside the range."""
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def describe(self) -> str:
        """``[0, 1]``, ``(0, inf)``, ... as a message shows it."""
        left = "(" if self.low_open or math.isinf(self.low) else "["
        right = ")" if self.high_open or math.isinf(self.high) else "]"
        return f"{left}{_number(self.low)}, {_number(self.high)}{right}"


@dataclass(frozen=True)
class MethodInfo:
    """What :mod:`fusekit.tune` needs to know of a merge method without importing its operator.

    Attributes:
        base: ``required``, ``optional`` or ``unused`` as in :class:`fusekit.ops.MergeMethod`.
        params: every parameter name recipes may give; its range when it is a number, None when it is
            a true/false or whole-number setting (not searchable).
    """

    base: Literal["required", "optional", "unused"]
    params: Mapping[str, ParamRange | None]


_ANY = ParamRange()
_UNIT = ParamRange(0.0, 1.0)
_NOT_NEGATIVE = ParamRange(0.0)
_TASK_VECTOR_METHOD = {"normalize": None, "rescale": None, "lambda": _ANY, "int8_mask": None}
_TASK_VECTOR = {"weight": _ANY, "density": _UNIT, **_TASK_VECTOR_METHOD}
_BREADCRUMBS = {**_TASK_VECTOR, "gamma": _UNIT}
_DELLA = {**_TASK_VECTOR, "epsilon": _NOT_NEGATIVE}

METHODS: dict[str, MethodInfo] = {
    "arcee_fusion": MethodInfo("required", {}),
    "breadcrumbs": MethodInfo("required", _BREADCRUMBS),
    "breadcrumbs_ties": MethodInfo("required", _BREADCRUMBS),
    "dare_linear": MethodInfo("required", _TASK_VECTOR),
    "dare_ties": MethodInfo("required", _TASK_VECTOR),
    "della": MethodInfo("required", _DELLA),
    "della_linear": MethodInfo("required", _DELLA),
    "expert_noise": MethodInfo("unused", {"noise_scale": _NOT_NEGATIVE, "scale": _ANY}),
    "karcher": MethodInfo("unused", {"max_iter": None, "tol": _NOT_NEGATIVE}),
    "linear": MethodInfo("unused", {"weight": _ANY, "normalize": None}),
    "model_stock": MethodInfo("required", {"filter_wise": None}),
    "multislerp": MethodInfo("optional", {"weight": _ANY, "normalize_weights": None, "eps": _ANY}),
    "nearswap": MethodInfo("required", {"t": _ANY}),
    "nuslerp": MethodInfo("optional", {"weight": _ANY, "nuslerp_flatten": None, "nuslerp_row_wise": None}),
    "passthrough": MethodInfo("unused", {"scale": _ANY}),
    "ram": MethodInfo("required", {"epsilon": _ANY}),
    "ramplus_tl": MethodInfo("required", {"r": _ANY, "alpha": _ANY, "epsilon": _ANY}),
    "sce": MethodInfo("required", {"int8_mask": None, "select_topk": _UNIT}),
    "slerp": MethodInfo("required", {"t": _ANY}),
    "task_arithmetic": MethodInfo("required", _TASK_VECTOR),
    "ties": MethodInfo("required", _TASK_VECTOR),
}
"""Every merge method's base use and parameters (names as recipes spell them) with their ranges."""

ENSEMBLE_WEIGHT = ParamRange(0.0, INF, low_open=True)
"""An ensemble member's weight: any number above 0."""

GRADIENT_METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "dare_linear")
"""Methods whose merged weights are differentiable in their coefficients (the ``adam`` optimiser;
TIES' and DARE's masks are held fixed)."""
GRADIENT_PARAMETERS = ("weight", "lambda")
"""The coefficients the ``adam`` optimiser learns."""


def _number(value: float) -> str:
    if math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:g}"


def round_value(value: float) -> float:
    """``value`` rounded to 6 significant digits, so that a recipe written to YAML reads back the same.

    >>> round_value(0.123456789)
    0.123457
    """
    rounded = float(f"{value:.{SIGNIFICANT_DIGITS}g}")
    return 0.0 if rounded == 0 else rounded


@dataclass(frozen=True)
class Dimension:
    """One coordinate of the search: a number between ``low`` and ``high``, or one of ``choices``.

    Attributes:
        path: where in the recipe, as messages and reports show it: ``models[1].parameters.weight``,
            ``models[1].parameters.weight[2]`` (knot 2 of a grouped space), ``merge_method``.
        low / high: the bounds of a numeric dimension (values, not unit).
        scale: ``linear`` or ``log`` (then ``low > 0``).
        choices: the values of a categorical dimension (merge methods), else None.
        loc: the location of the search space in the recipe's data (parsed from ``path`` if empty).
        group: the knot index of a grouped space (its values form a gradient list), else None.
        groups: the number of knots of that space (1 for an ungrouped one).

    Example:
        >>> Dimension("parameters.lambda", 0.5, 2.0).value(0.5)
        1.25
        >>> Dimension("merge_method", 0, 1, choices=("linear", "ties")).value(0.7)
        'ties'
    """

    path: str
    low: float = 0.0
    high: float = 1.0
    scale: Scale = "linear"
    choices: tuple[str, ...] | None = None
    loc: Location = ()
    group: int | None = None
    groups: int = 1

    def location(self) -> Location:
        """Where the value goes in the recipe's data (the gradient list itself for a grouped space)."""
        return self.loc or parse_path(self.path)[: -1 if self.group is not None else None]

    def value(self, unit: float) -> float | str:
        """The recipe value at the unit coordinate ``unit`` (clipped to [0, 1]), rounded to 6 digits."""
        u = min(max(float(unit), 0.0), 1.0)
        if self.choices is not None:
            return self.choices[min(int(u * len(self.choices)), len(self.choices) - 1)]
        if self.scale == "log":
            raw = math.exp(math.log(self.low) + u * (math.log(self.high) - math.log(self.low)))
        else:
            raw = self.low + u * (self.high - self.low)
        return min(max(round_value(raw), self.low), self.high)

    def unit(self, value: float | str) -> float:
        """The unit coordinate of a recipe value (a choice maps to the middle of its bin)."""
        if self.choices is not None:
            return (self.choices.index(str(value)) + 0.5) / len(self.choices)
        number = min(max(float(value), self.low), self.high)
        if self.scale == "log":
            return (math.log(number) - math.log(self.low)) / (math.log(self.high) - math.log(self.low))
        return (number - self.low) / (self.high - self.low)

    def default_unit(self) -> float:
        """The hand-set starting value: the middle of the range, or the first choice."""
        return self.unit(self.choices[0]) if self.choices is not None else 0.5


def parse_path(path: str) -> Location:
    """``models[1].parameters.weight`` → ``('models', 1, 'parameters', 'weight')``.

    >>> parse_path("slices[0].sources[1].parameters.t")
    ('slices', 0, 'sources', 1, 'parameters', 't')
    """
    loc: list[str | int] = []
    for part in path.split("."):
        name, _, rest = part.partition("[")
        if name:
            loc.append(name)
        for index in filter(None, rest.replace("]", "").split("[")) if rest else []:
            loc.append(int(index))
    return tuple(loc)


def format_path(loc: Location) -> str:
    """``('models', 1, 'weight')`` → ``models[1].weight`` (the inverse of :func:`parse_path`)."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


@dataclass(frozen=True)
class SearchSpace:
    """The dimensions of a tune recipe and the recipe they fill in.

    Attributes:
        dims: the coordinates, in recipe order (knots of a grouped space in a row).
        template: the recipe without its ``tune:`` block, search spaces still in place.
        kind: ``merge`` or ``ensemble``.

    Example:
        >>> template = {"merge_method": "task_arithmetic", "parameters": {"lambda": {"search": [0, 2]}}}
        >>> space = SearchSpace((Dimension("parameters.lambda", 0.0, 2.0),), template)
        >>> space.recipe_for([0.25])["parameters"]
        {'lambda': 0.5}
    """

    dims: tuple[Dimension, ...]
    template: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)
    kind: Literal["merge", "ensemble"] = "merge"

    def recipe_for(self, x: Sequence[float]) -> dict[str, Any]:
        """The plain recipe at the unit point ``x``: no ``search`` and no ``tune`` key.

        A grouped space becomes its gradient list; a searched method that takes no base model
        (``linear``) leaves ``base_model`` out of its candidates, so that the base is not merged as
        one more model.

        Args:
            x: one unit coordinate per dimension.

        Returns:
            The recipe as a dict in mergekit's format, values rounded to 6 significant digits.

        Raises:
            ValueError: ``x`` has the wrong length (a bug in the caller).
        """
        if len(x) != len(self.dims):
            raise ValueError(f"a point of this space has {len(self.dims)} coordinates, got {len(x)}")
        recipe = copy.deepcopy(dict(self.template))
        recipe.pop("tune", None)
        gradients: dict[Location, list[Any]] = {}
        for dim, unit in zip(self.dims, x, strict=True):
            value = dim.value(unit)
            if dim.group is None:
                _set_at(recipe, dim.location(), value)
            else:
                gradients.setdefault(dim.location(), [None] * dim.groups)[dim.group] = value
        for loc, values in gradients.items():
            _set_at(recipe, loc, values)
        method = recipe.get("merge_method")
        searched_method = any(dim.choices is not None for dim in self.dims)
        if searched_method and isinstance(method, str) and method in METHODS \
                and METHODS[method].base == "unused":
            recipe.pop("base_model", None)
        return recipe

    def key(self, x: Sequence[float]) -> str:
        """A digest of the canonical :meth:`recipe_for` ``(x)``: two points giving one recipe share it."""
        text = json.dumps(self.recipe_for(x), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def default_point(self) -> list[float]:
        """The hand-set recipe's point (middle of every range, equal weights, the first method): the
        first candidate every optimiser tries."""
        return [dim.default_unit() for dim in self.dims]

    def values(self, x: Sequence[float]) -> dict[str, float | str]:
        """Each dimension's path and its recipe value at ``x`` (for reports)."""
        return {dim.path: dim.value(unit) for dim, unit in zip(self.dims, x, strict=True)}


def _set_at(data: Any, loc: Location, value: Any) -> None:
    for part in loc[:-1]:
        data = data[part]
    data[loc[-1]] = value


# -- reading search spaces from a recipe --------------------------------------------------------------

Problem = tuple[Location, str]
SPACE_KEYS = ("search", "scale", "groups")
MAX_GROUPS = 64
"""Most knots a grouped space may have (far more than layer groups worth tuning)."""
DEFAULT_ENSEMBLE_BOUNDS = (0.01, 1.0)
"""The range of every member weight of an ensemble recipe that searches none explicitly."""


@dataclass(frozen=True)
class _Where:
    """What a search space's location says it sets."""

    what: Literal["method", "parameter", "member", "other"]
    name: str = ""
    whole: bool = True  # the whole value (``groups`` allowed), not one knot of a gradient


def _where(loc: Location, kind: str) -> _Where:
    if kind == "ensemble":
        member = len(loc) in (3, 4) and loc[0] == "models" and isinstance(loc[1], int) and loc[-1] == "weight"
        if member and (len(loc) == 3 or loc[2] == "parameters"):
            return _Where("member", "weight")
        return _Where("other")
    if loc == ("merge_method",):
        return _Where("method")
    for i, part in enumerate(loc[:-1]):
        if part == "parameters" and isinstance(loc[i + 1], str):
            tail = loc[i + 2:]
            if tail == () or (len(tail) == 2 and isinstance(tail[0], int) and tail[1] == "value"):
                return _Where("parameter", str(loc[i + 1]))
            if len(tail) == 1 and isinstance(tail[0], int):
                return _Where("parameter", str(loc[i + 1]), whole=False)
    return _Where("other")


def parse_spaces(data: Mapping[str, Any], kind: Literal["merge", "ensemble"],
                 methods: Sequence[str]) -> tuple[SearchSpace, list[Problem]]:
    """The search space of a recipe's data, and every problem with its search spaces.

    Args:
        data: the parsed recipe (its ``tune:`` block is ignored).
        kind: ``merge`` or ``ensemble``.
        methods: the merge methods a candidate may use (the searched ones, or the one given); a
            searched parameter must be a number every one of them takes, inside its range.

    Returns:
        The space (an empty one when there are problems) and the problems as (location, message).
    """
    from fusekit.recipe.kind import search_space_locations

    template = {k: v for k, v in data.items() if k != "tune"}
    dims: list[Dimension] = []
    problems: list[Problem] = []
    for loc in search_space_locations(template):
        spec = _at(template, loc)
        where = _where(loc, kind)
        if where.what == "method":
            found, wrong = _method_dims(loc, spec)
        elif where.what == "other":
            found, wrong = [], [(loc, _misplaced(kind))]
        else:
            found, wrong = _numeric_dims(loc, spec, where, kind, methods)
        dims += found
        problems += wrong
    if kind == "ensemble" and not dims and not problems:
        dims = _every_member(template)
    return SearchSpace(tuple(dims) if not problems else (), template, kind), problems


def _misplaced(kind: str) -> str:
    if kind == "ensemble":
        return ("an ensemble recipe searches only its members' weights (models[i].weight); give a "
                "value here")
    return ("a search space must stand for a number in parameters (weight, density, ...) or for "
            "merge_method; give a value here")


def _at(data: Any, loc: Location) -> Any:
    for part in loc:
        data = data[part]
    return data


def _unknown_keys(loc: Location, spec: Mapping[str, Any], allowed: Sequence[str]) -> list[Problem]:
    from fusekit.recipe.load import short_repr, suggest

    return [((*loc, key), f"unknown key {short_repr(key)} in a search space{suggest(str(key), allowed)}")
            for key in spec if key not in allowed]


def _method_dims(loc: Location, spec: Mapping[str, Any]) -> tuple[list[Dimension], list[Problem]]:
    from fusekit.recipe.load import short_repr, suggest

    problems = _unknown_keys(loc, spec, ("search",))
    names = spec["search"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        problems.append(((*loc, "search"), "a method search lists merge methods, e.g. "
                         f"[linear, ties, dare_ties], got {short_repr(names)}"))
        return [], problems
    for i, name in enumerate(names):
        if name not in METHODS:
            hint = suggest(name, METHODS).replace("valid keys", "valid methods")
            problems.append(((*loc, "search", i), f"unknown merge method '{name}'{hint}"))
        elif name in names[:i]:
            problems.append(((*loc, "search", i), f"'{name}' is listed twice; list each method once"))
    return [Dimension("merge_method", choices=tuple(names), loc=loc)], problems


def _numeric_dims(loc: Location, spec: Mapping[str, Any], where: _Where, kind: str,
                  methods: Sequence[str]) -> tuple[list[Dimension], list[Problem]]:
    problems = _unknown_keys(loc, spec, SPACE_KEYS)
    bounds = _bounds(loc, spec)
    groups = _groups(loc, spec, where)
    if isinstance(bounds, str) or isinstance(groups, str):
        problems += [((*loc, key), text) for key, text in (("search", bounds), ("groups", groups))
                     if isinstance(text, str)]
        return [], problems
    low, high, scale = bounds
    ranges = [("an ensemble member's weight", ENSEMBLE_WEIGHT)] if kind == "ensemble" else None
    if ranges is None:
        ranges, wrong = _parameter_ranges(where.name, methods)
        if wrong:
            return [], [*problems, (loc, wrong)]
    for owner, valid in ranges:
        if not (valid.contains(low) and valid.contains(high)):
            problems.append(((*loc, "search"), f"the bounds [{_number(low)}, {_number(high)}] leave the "
                             f"valid range of {owner}, {valid.describe()}; keep both inside it"))
            break
    path = format_path(loc)
    if groups == 1:
        return [Dimension(path, low, high, scale, loc=loc)], problems
    return [Dimension(f"{path}[{g}]", low, high, scale, loc=loc, group=g, groups=groups)
            for g in range(groups)], problems


def _bounds(loc: Location, spec: Mapping[str, Any]) -> tuple[float, float, Scale] | str:
    """(low, high, scale) of a numeric search space, or what is wrong with it."""
    from fusekit.recipe.load import short_repr

    bounds, scale = spec["search"], spec.get("scale", "linear")
    numbers = isinstance(bounds, list) and len(bounds) == 2 and all(_is_number(b) for b in bounds)
    if not numbers or not all(math.isfinite(float(b)) for b in bounds):
        return f"a search space takes [low, high], two finite numbers, got {short_repr(bounds)}"
    low, high = float(bounds[0]), float(bounds[1])
    if low > high:
        return (f"the bounds are reversed: low {_number(low)} is above high {_number(high)}; write "
                f"[{_number(high)}, {_number(low)}]")
    if low == high:
        return f"low and high are both {_number(low)}; write the value itself instead of a search space"
    if scale not in ("linear", "log"):
        return f"scale must be linear or log, got {short_repr(scale)}"
    if scale == "log" and low <= 0:
        return (f"a log scale needs low > 0, got {_number(low)}; raise low (e.g. to 0.01) or use "
                "scale: linear")
    return low, high, scale


def _groups(loc: Location, spec: Mapping[str, Any], where: _Where) -> int | str:
    """The number of knots (1 when not given), or what is wrong with ``groups``."""
    from fusekit.recipe.load import short_repr

    groups = spec.get("groups", 1)
    if isinstance(groups, bool) or not isinstance(groups, int) or not 1 <= groups <= MAX_GROUPS:
        return f"groups must be a whole number from 1 to {MAX_GROUPS}, got {short_repr(groups)}"
    if groups > 1 and (not where.whole or where.what == "member"):
        inside = "an ensemble member's weight" if where.what == "member" else "one knot of a gradient"
        return f"groups cannot apply to {inside}; remove groups (or make the whole parameter the search)"
    return groups


def _parameter_ranges(name: str, methods: Sequence[str]) -> tuple[list[tuple[str, ParamRange]], str]:
    """The valid range of parameter ``name`` under each method, or why it cannot be searched."""
    ranges: list[tuple[str, ParamRange]] = []
    for method in methods:
        info = METHODS.get(method)
        if info is None:
            continue  # an unknown method is its own error
        if name not in info.params:
            takes = ", ".join(sorted(info.params)) or "no parameters"
            return [], f"'{name}' is not a parameter of {method} ({method} takes: {takes})"
        valid = info.params[name]
        if valid is None:
            return [], (f"'{name}' is not a number (a true/false or whole-number setting of "
                        f"{method}); a search space needs a numeric parameter")
        ranges.append((f"{name} in {method}", valid))
    return ranges, ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _every_member(template: Mapping[str, Any]) -> list[Dimension]:
    """One dimension per member weight of an ensemble recipe that names no search space."""
    low, high = DEFAULT_ENSEMBLE_BOUNDS
    models = template.get("models")
    members = models if isinstance(models, list) else []
    dims = []
    for i, member in enumerate(members):
        if isinstance(member, dict):
            inner = isinstance(member.get("parameters"), dict) and "weight" in member["parameters"]
            loc: Location = ("models", i, "parameters", "weight") if inner else ("models", i, "weight")
            dims.append(Dimension(format_path(loc), low, high, loc=loc))
    return dims


def parameter_name(loc: Location) -> str | None:
    """The parameter a merge recipe's search space at ``loc`` sets (``weight``, ...), else None."""
    where = _where(loc, "merge")
    return where.name if where.what == "parameter" else None
