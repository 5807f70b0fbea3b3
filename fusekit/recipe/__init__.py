"""Recipes: the YAML files that say what to merge and how."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from fusekit.recipe.load import RecipeSource, load_recipe, parse_recipe
from fusekit.recipe.schema import MergeRecipe


def load_merge_recipe(path: Path | str, *, strict: bool = False) -> tuple[MergeRecipe, RecipeSource]:
    """Read, parse and validate a merge recipe file.

    Settings that have no effect (mergekit ignores them: a parameter the method does not take, a
    model listed twice) are logged as warnings naming their line, and the recipe is returned as it
    merges (see :func:`fusekit.recipe.checks.settle`); ``strict`` makes them errors.

    Args:
        path: the YAML recipe (mergekit's format).
        strict: refuse settings that have no effect instead of warning about them.

    Returns:
        The recipe and its source (text and line marks, for later errors that name a line).

    Raises:
        RecipeError: one line naming the file, line, key and what to write instead (every problem
            found, together).

    Example:
        >>> recipe, _ = load_merge_recipe("configs/linear.yaml")  # doctest: +SKIP
    """
    from fusekit.recipe.checks import check_merge_recipe, settle

    recipe, source = load_recipe(path, MergeRecipe, partial(check_merge_recipe, strict=strict))
    return settle(recipe, source), source


def parse_merge_recipe(text: str, name: str = "<recipe>", *,
                       strict: bool = False) -> tuple[MergeRecipe, RecipeSource]:
    """Parse and validate a merge recipe held in memory, like :func:`load_merge_recipe`.

    Args:
        text: the YAML text.
        name: what error messages call it (a file name, say).
        strict: refuse settings that have no effect instead of warning about them.

    Returns:
        The recipe and its source.

    Raises:
        RecipeError: as :func:`load_merge_recipe`.

    Example:
        >>> parse_merge_recipe("{merge_method: linear, models: [{model: a}]}")[0].merge_method
        'linear'
    """
    from fusekit.recipe.checks import check_merge_recipe, settle

    recipe, source = parse_recipe(text, name, MergeRecipe, partial(check_merge_recipe, strict=strict))
    return settle(recipe, source), source


__all__ = ["MergeRecipe", "RecipeSource", "load_merge_recipe", "parse_merge_recipe"]
