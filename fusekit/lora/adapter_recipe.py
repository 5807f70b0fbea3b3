"""``output: adapter`` recipes: merging LoRA adapters into one adapter, checked without torch.

A recipe with ``output: adapter`` names PEFT combination types (``LoraModel.add_weighted_adapter``)
as its ``merge_method``; every model is a LoRA adapter over one base. Parameters are PEFT's: a
``weight`` per model (default 1.0; a top-level ``weight`` is every model's default), and at the top
level ``density`` (the types that prune) and ``majority_sign_method`` (the TIES types). ``rank`` is
the output rank of the SVD types (required there, refused elsewhere: ``cat`` sums the ranks, the
other types keep the adapters' common rank). Example::

    output: adapter
    merge_method: ties_svd
    rank: 16
    base_model: demo-models/base
    models:
      - {model: demo-models/lora/math, parameters: {weight: 1.0}}
      - {model: demo-models/lora/code, parameters: {weight: 0.5}}
    parameters: {density: 0.5, majority_sign_method: total}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusekit.recipe.load import Location, short_repr, suggest
from fusekit.recipe.numbers import is_number
from fusekit.recipe.schema import MergeRecipe


@dataclass(frozen=True)
class Combination:
    """One of PEFT's combination types.

    Attributes:
        svd: the combined ΔW is factored again by a truncated SVD at ``rank``.
        density: the type prunes (``density`` is required).
        sign: the type elects a sign per entry (``majority_sign_method`` applies).
        stochastic: the type draws random masks (DARE), so the seed matters.
        same_rank: the type combines A and B factor-wise, so every adapter needs the same rank.
    """

    svd: bool = False
    density: bool = False
    sign: bool = False
    stochastic: bool = False
    same_rank: bool = False


COMBINATIONS: dict[str, Combination] = {
    "linear": Combination(same_rank=True),
    "cat": Combination(),
    "svd": Combination(svd=True),
    "ties": Combination(density=True, sign=True, same_rank=True),
    "ties_svd": Combination(svd=True, density=True, sign=True),
    "dare_linear": Combination(density=True, stochastic=True, same_rank=True),
    "dare_linear_svd": Combination(svd=True, density=True, stochastic=True),
    "dare_ties": Combination(density=True, sign=True, stochastic=True, same_rank=True),
    "dare_ties_svd": Combination(svd=True, density=True, sign=True, stochastic=True),
    "magnitude_prune": Combination(density=True, same_rank=True),
    "magnitude_prune_svd": Combination(svd=True, density=True),
}
SIGN_METHODS = ("total", "frequency")
NOT_FOR_ADAPTERS = {
    "slices": "an adapter merge takes 'models'",
    "modules": "an adapter merge takes 'models'",
    "dtype": "PEFT computes in the adapters' dtype",
    "out_dtype": "the adapter is written in the adapters' dtype",
    "tokenizer_source": "an adapter uses its base's tokenizer",
    "tokenizer": "an adapter uses its base's tokenizer",
    "chat_template": "an adapter uses its base's chat template",
}
Problem = tuple[Location, str]


@dataclass(frozen=True)
class AdapterMergeOptions:
    """What ``add_weighted_adapter`` is called with, read from a checked recipe."""

    combination: str
    weights: tuple[float, ...]
    rank: int | None
    density: float | None
    majority_sign_method: str


def is_adapter_output(recipe: MergeRecipe) -> bool:
    """Whether ``recipe`` writes an adapter (``output: adapter``)."""
    return recipe.output == "adapter"


def adapter_recipe_problems(recipe: MergeRecipe) -> list[Problem]:
    """Every problem of an ``output: adapter`` recipe (or of ``rank`` without it), as (location,
    message) pairs; the adapters themselves are checked when they are resolved."""
    if not is_adapter_output(recipe):
        return [(("rank",), "'rank' applies to 'output: adapter' only (the rank of an SVD combination); "
                            "remove it, or add 'output: adapter'")] if recipe.rank is not None else []
    combination = COMBINATIONS.get(recipe.merge_method)
    if combination is None:
        close = suggest(recipe.merge_method, list(COMBINATIONS))
        hint = f" ({close.removeprefix('; ')})" if "did you mean" in close else ""
        return [(("merge_method",), f"'{recipe.merge_method}' is not a PEFT combination type{hint}; "
                                    f"output: adapter takes one of {', '.join(COMBINATIONS)}")]
    problems: list[Problem] = [((key,), f"'{key}' does not apply to 'output: adapter' ({why}); remove it")
                for key, why in NOT_FOR_ADAPTERS.items() if getattr(recipe, key) is not None]
    problems += _rank_problems(recipe, combination)
    problems += _parameter_problems(recipe, combination)
    return problems


def _rank_problems(recipe: MergeRecipe, combination: Combination) -> list[Problem]:
    if combination.svd and recipe.rank is None:
        return [(("merge_method",), f"{recipe.merge_method} factors the merged ΔW by SVD and needs "
                                    "'rank: <output rank>' (e.g. rank: 16)")]
    if not combination.svd and recipe.rank is not None:
        kept = "the sum of the adapters' ranks" if recipe.merge_method == "cat" else "the adapters' rank"
        return [(("rank",), f"{recipe.merge_method} does not take 'rank' (its output has {kept}); remove "
                            "it, or use an _svd combination type")]
    return []


def _parameter_problems(recipe: MergeRecipe, combination: Combination) -> list[Problem]:
    allowed = {"weight"} | ({"density"} if combination.density else set()) | (
        {"majority_sign_method"} if combination.sign else set())
    problems: list[Problem] = []
    for name, value in (recipe.parameters or {}).items():
        problems += _parameter_problem(("parameters", name), name, value, allowed, recipe.merge_method)
    for i, entry in enumerate(recipe.models or []):
        for name, value in (entry.parameters or {}).items():
            loc = ("models", i, "parameters", name)
            if name in allowed - {"weight"}:
                problems.append((loc, f"PEFT takes one '{name}' for all adapters; move it to the "
                                      "top-level parameters"))
            else:
                problems += _parameter_problem(loc, name, value, {"weight"}, recipe.merge_method)
    if combination.density and "density" not in (recipe.parameters or {}):
        problems.append((("parameters",), f"{recipe.merge_method} prunes and needs 'density' (the "
                                          "share of entries kept, in (0, 1]) in the top-level parameters"))
    return problems


def _parameter_problem(loc: Location, name: str, value: Any, allowed: set[str],
                       method: str) -> list[Problem]:
    if name not in allowed:
        return [(loc, f"'{name}' is not a parameter of {method} in an adapter merge ({method} "
                      f"takes: {', '.join(sorted(allowed))})")]
    if name == "majority_sign_method":
        if value not in SIGN_METHODS:
            return [(loc, f"must be one of {', '.join(SIGN_METHODS)}, got {short_repr(value)}")]
        return []
    if not is_number(value):
        return [(loc, f"must be a single number in an adapter merge (no gradients or filters), got "
                      f"{short_repr(value)}")]
    if name == "density" and not 0 < float(value) <= 1:
        return [(loc, f"must be in (0, 1], got {short_repr(value)}")]
    return []


def adapter_merge_options(recipe: MergeRecipe) -> AdapterMergeOptions:
    """The arguments of ``add_weighted_adapter`` for a recipe :func:`adapter_recipe_problems` passed."""
    top = recipe.parameters or {}
    default_weight = float(top.get("weight", 1.0))
    weights = tuple(float((entry.parameters or {}).get("weight", default_weight))
                    for entry in recipe.models or [])
    density = top.get("density")
    return AdapterMergeOptions(
        combination=recipe.merge_method, weights=weights, rank=recipe.rank,
        density=None if density is None else float(density),
        majority_sign_method=str(top.get("majority_sign_method", "total")))
