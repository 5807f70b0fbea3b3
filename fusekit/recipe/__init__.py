"""Recipes: the YAML files that say what to merge and how."""

from __future__ import annotations

from pathlib import Path

from fusekit.recipe.load import RecipeSource, load_recipe, parse_recipe
from fusekit.recipe.schema import MergeRecipe


def load_merge_recipe(path: Path | str) -> tuple[MergeRecipe, RecipeSource]:
    """Read, parse and validate a merge recipe; raise RecipeError naming file and line."""
    from fusekit.recipe.checks import check_merge_recipe

    return load_recipe(path, MergeRecipe, check_merge_recipe)


def parse_merge_recipe(text: str, name: str = "<recipe>") -> tuple[MergeRecipe, RecipeSource]:
    """Like :func:`load_merge_recipe` for YAML text held in memory."""
    from fusekit.recipe.checks import check_merge_recipe

    return parse_recipe(text, name, MergeRecipe, check_merge_recipe)


__all__ = ["MergeRecipe", "RecipeSource", "load_merge_recipe", "parse_merge_recipe"]
