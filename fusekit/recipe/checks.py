"""Checks that need the method registry: method name, parameter names, parameter values.

They run when the recipe loads, so a typo in a parameter fails before any tensor is read.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cache
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from fusekit.ops import MergeMethod, get_method, method_names
from fusekit.recipe.load import Location, format_location, short_repr, suggest
from fusekit.recipe.schema import Filtered, MergeRecipe, ParameterValue

Problem = tuple[Location, str]
log = logging.getLogger("fusekit")


def check_merge_recipe(recipe: MergeRecipe) -> list[Problem]:
    """Every problem with the method and its parameters, as (location, message) pairs."""
    try:
        method = get_method(recipe.merge_method)
    except KeyError:
        hint = suggest(recipe.merge_method, method_names()).replace("valid keys", "valid methods")
        return [(("merge_method",), f"unknown merge method '{recipe.merge_method}'{hint}")]
    problems: list[Problem] = []
    for loc, table in _parameter_tables(recipe):
        for name, value in table.items():
            problems.extend(_check_parameter(method, (*loc, name), name, value))
    problems.extend(_check_models(method, recipe))
    return problems


def _parameter_tables(recipe: MergeRecipe) -> Iterator[tuple[Location, dict[str, Any]]]:
    if recipe.parameters:
        yield ("parameters",), recipe.parameters
    for i, entry in enumerate(recipe.models or []):
        if entry.parameters:
            yield ("models", i, "parameters"), entry.parameters
    for i, out_slice in enumerate(recipe.slices or []):
        if out_slice.parameters:
            yield ("slices", i, "parameters"), out_slice.parameters
        for j, source in enumerate(out_slice.sources):
            if source.parameters:
                yield ("slices", i, "sources", j, "parameters"), source.parameters


def _check_parameter(method: MergeMethod, loc: Location, name: str,
                     value: ParameterValue) -> list[Problem]:
    names = method.parameter_names()
    if name not in names:
        valid = ", ".join(sorted(names)) or "none"
        close = suggest(name, names) if names else ""
        hint = close if "did you mean" in close else ""
        return [(loc, f"'{name}' is not a parameter of {method.name}{hint} "
                      f"({method.name} takes: {valid})")]
    if names[name] == "method" and ("models" in loc[:1] or "sources" in loc):
        log.warning("%s: '%s' applies to the whole merge, so it has no effect on one model; "
                    "move it to the top-level parameters", format_location(loc), name)
    adapter = _adapter(method.name, name)
    problems = []
    for leaf_loc, leaf in _leaves(loc, value):
        try:
            adapter.validate_python(leaf)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
            problems.append((leaf_loc, f"{reason}, got {short_repr(leaf)}"))
    return problems


def _leaves(loc: Location, value: ParameterValue) -> Iterator[tuple[Location, Any]]:
    if isinstance(value, tuple) and value and isinstance(value[0], Filtered):
        for k, entry in enumerate(value):
            assert isinstance(entry, Filtered)
            yield from _leaves((*loc, k, "value"), entry.value)
    elif isinstance(value, tuple):
        for k, point in enumerate(value):
            yield (*loc, k), point
    else:
        yield loc, value


@cache
def _adapter(method_name: str, yaml_name: str) -> TypeAdapter[Any]:
    method = get_method(method_name)
    for model in (method.model_params, method.method_params):
        for field_name, field in model.model_fields.items():
            if (field.alias or field_name) == yaml_name:
                annotation: Any = field.annotation
                if field.metadata:
                    annotation = Annotated[(annotation, *field.metadata)]
                return TypeAdapter(annotation)
    raise KeyError(yaml_name)


def _check_models(method: MergeMethod, recipe: MergeRecipe) -> list[Problem]:
    problems: list[Problem] = []
    if method.base == "required":
        slices_lack_base = any(s.base_model is None for s in recipe.slices or [])
        if recipe.base_model is None and (recipe.slices is None or slices_lack_base):
            problems.append((("merge_method",), f"{method.name} needs a base model; add "
                             "'base_model: <the model the others were fine-tuned from>'"))
    groups: list[tuple[Location, list[str], str | None]] = []
    if recipe.models is not None:
        groups.append((("models",), [m.model for m in recipe.models], recipe.base_model))
    for i, out_slice in enumerate(recipe.slices or []):
        groups.append((("slices", i, "sources"), [s.model for s in out_slice.sources],
                       out_slice.base_model or recipe.base_model))
    for loc, refs, base in groups:
        separate_base = method.base != "unused" and base is not None
        count = len([r for r in refs if r != base]) if separate_base else len(refs)
        problems.extend(_count_problem(method, loc, count, separate_base))
    return problems


def _count_problem(method: MergeMethod, loc: Location, count: int,
                   separate_base: bool) -> list[Problem]:
    low, high = method.min_models, method.max_models

    def models(n: int) -> str:
        noun = "model" if n == 1 else "models"
        return f"{n} {noun} besides the base" if separate_base else f"{n} {noun}"

    if count < low:
        return [(loc, f"{method.name} needs at least {models(low)}, got {count}")]
    if high is not None and count > high:
        exact = "exactly" if low == high else "at most"
        return [(loc, f"{method.name} takes {exact} {models(high)}, got {count}")]
    return []
