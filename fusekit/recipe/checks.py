"""Checks that need the method registry: method name, parameter names, parameter values.

They run when the recipe loads, so a typo in a parameter fails before any tensor is read.

A setting that mergekit accepts and silently ignores is not an error here either, but a warning
naming its line (:func:`ignored_settings`, reported by :func:`settle`): a parameter that some merge
method takes, written where the chosen method does not take it (``density`` under ``sce``,
``weight`` under ``model_stock``), a ``dtype`` inside ``parameters``, a method-wide parameter on
one model, and a model listed twice in ``models:``. ``strict=True`` (``--strict``) makes each of
them an error. A name that no method takes stays an error with a suggestion: typos are what
strictness is for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from functools import cache
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from fusekit.chat_templates import template_problem
from fusekit.lora.adapter_recipe import adapter_recipe_problems, is_adapter_output
from fusekit.ops import MergeMethod, get_method, method_names
from fusekit.recipe.load import Location, RecipeSource, format_location, short_repr, suggest
from fusekit.recipe.schema import Filtered, MergeRecipe, ModelEntry, ParameterValue

Problem = tuple[Location, str]
log = logging.getLogger("fusekit")

STRICT_NOTE = "; --strict refuses settings that have no effect"


def check_merge_recipe(recipe: MergeRecipe, *, strict: bool = False) -> list[Problem]:
    """Every problem with the method, its parameters and the chat template, as (location, message)
    pairs; with ``strict``, every :func:`ignored_settings` entry too."""
    if is_adapter_output(recipe) or recipe.rank is not None:  # PEFT combination types, not ours
        return adapter_recipe_problems(recipe)
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
    if recipe.chat_template is not None and (problem := template_problem(recipe.chat_template)):
        problems.append((("chat_template",), problem))
    if strict:
        problems.extend((loc, message + STRICT_NOTE) for loc, message in ignored_settings(recipe))
    return problems


def ignored_settings(recipe: MergeRecipe) -> list[Problem]:
    """Settings that have no effect on this merge (mergekit ignores them silently), as (location,
    message) pairs; empty for an unknown method (that is an error of its own)."""
    if is_adapter_output(recipe):
        return _repeated_models(recipe)
    try:
        method = get_method(recipe.merge_method)
    except KeyError:
        return []
    found: list[Problem] = []
    for loc, table in _parameter_tables(recipe):
        for name in table:
            message = _ignored_parameter(method, loc, name)
            if message is not None:
                found.append(((*loc, name), message))
    return found + _repeated_models(recipe)


def settle(recipe: MergeRecipe, source: RecipeSource) -> MergeRecipe:
    """Warn once, on the ``fusekit`` logger, about every setting that has no effect (naming its
    ``file:line``), and return the recipe as it merges: a model listed twice in ``models:`` becomes
    one entry, each parameter taken from the first entry that sets it (as mergekit does).

    Example:
        >>> from fusekit.recipe import parse_merge_recipe
        >>> len(parse_merge_recipe("{merge_method: linear, models: [{model: a}, {model: a}]}")[0].models)
        1
    """
    for loc, message in ignored_settings(recipe):
        label = format_location(loc)
        log.warning("warning: %s %s: %s", source.where(loc), label, message)
    if recipe.models is None or len({m.model for m in recipe.models}) == len(recipe.models):
        return recipe
    merged: dict[str, ModelEntry] = {}
    for entry in recipe.models:
        first = merged.setdefault(entry.model, entry)
        params = {**(entry.parameters or {}), **(first.parameters or {})}
        merged[entry.model] = first.model_copy(update={"parameters": params or None})
    return recipe.model_copy(update={"models": list(merged.values())})


def _ignored_parameter(method: MergeMethod, loc: Location, name: str) -> str | None:
    names = method.parameter_names()
    if name in names:
        if names[name] == "method" and _per_model(loc):
            return (f"'{name}' applies to the whole merge, so it has no effect on one model; move it to "
                    "the top-level parameters")
        return None
    if name == "dtype":
        return ("'dtype' has no effect inside parameters (mergekit ignores it too); write it at the top "
                "level, 'dtype: ...', to set the compute dtype")
    if name in _any_method_parameter():
        takes = ", ".join(sorted(names)) or "no parameters"
        return (f"{method.name} does not take '{name}', so it has no effect (mergekit ignores it "
                f"too); remove it ({method.name} takes: {takes})")
    return None


def _per_model(loc: Location) -> bool:
    """Whether ``loc`` is one model's parameters (a ``models`` entry or a slice source)."""
    return any(part in ("models", "sources") and isinstance(after, int)
               for part, after in zip(loc, loc[1:], strict=False))


@cache
def _any_method_parameter() -> frozenset[str]:
    return frozenset(name for method in method_names() for name in get_method(method).parameter_names())


def _repeated_models(recipe: MergeRecipe) -> list[Problem]:
    first: dict[str, int] = {}
    found: list[Problem] = []
    for i, entry in enumerate(recipe.models or []):
        if entry.model in first:
            found.append((("models", i), f"'{entry.model}' is listed again (first as "
                          f"models[{first[entry.model]}]); a model is merged once, as in mergekit, each "
                          "parameter taken from the first entry that sets it; list it once"))
        first.setdefault(entry.model, i)
    return found


def _parameter_tables(recipe: MergeRecipe) -> Iterator[tuple[Location, dict[str, Any]]]:
    if recipe.parameters:
        yield ("parameters",), recipe.parameters
    yield from _entry_tables((), recipe.models or [])
    yield from _slice_tables((), recipe.slices or [])
    for key, module in (recipe.modules or {}).items():
        if module.parameters:
            yield ("modules", key, "parameters"), module.parameters
        yield from _entry_tables(("modules", key), module.models or [])
        yield from _slice_tables(("modules", key), module.slices or [])


def _entry_tables(prefix: Location, entries: list[Any]) -> Iterator[tuple[Location, dict[str, Any]]]:
    for i, entry in enumerate(entries):
        if entry.parameters:
            yield (*prefix, "models", i, "parameters"), entry.parameters


def _slice_tables(prefix: Location, slices: list[Any]) -> Iterator[tuple[Location, dict[str, Any]]]:
    for i, out_slice in enumerate(slices):
        if out_slice.parameters:
            yield (*prefix, "slices", i, "parameters"), out_slice.parameters
        for j, source in enumerate(out_slice.sources):
            if source.parameters:
                yield (*prefix, "slices", i, "sources", j, "parameters"), source.parameters


def _check_parameter(method: MergeMethod, loc: Location, name: str,
                     value: ParameterValue) -> list[Problem]:
    names = method.parameter_names()
    if name not in names:
        if name == "dtype" or name in _any_method_parameter():
            return []  # no effect: ignored_settings reports it
        valid = ", ".join(sorted(names)) or "none"
        close = suggest(name, names) if names else ""
        hint = close if "did you mean" in close else ""
        return [(loc, f"'{name}' is not a parameter of {method.name}{hint} "
                      f"({method.name} takes: {valid})")]
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
        groups.append((("models",), list(dict.fromkeys(m.model for m in recipe.models)), recipe.base_model))
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
