"""``fusekit.merge`` and ``fusekit.plan_merge`` take a parsed ``MergeRecipe`` as well as a path: the same
plan and the same bytes, and the recipe copied beside the weights loads back to an equal recipe."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import load_weights, write_recipe

import fusekit
from fusekit.errors import RecipeError
from fusekit.merging import RECIPE_COPY, recipe_yaml
from fusekit.recipe import parse_merge_recipe
from fusekit.recipe.schema import Filtered, MergeRecipe, ModelEntry


def _ties_text(models: dict[str, Path]) -> str:
    return (f"merge_method: ties\nbase_model: {models['base']}\nmodels:\n"
            f"  - model: {models['math']}\n    parameters:\n      weight: [0.2, 0.8]\n"
            "      density: [{filter: mlp, value: 0.5}, {value: 0.7}]\n"
            f"  - model: {models['code']}\n    parameters: {{weight: 0.5, density: 0.6}}\n"
            "parameters: {normalize: true}\ndtype: float32\n")


def test_recipe_yaml_loads_back_to_an_equal_recipe(tiny_models: dict[str, Path]) -> None:
    recipe, _ = parse_merge_recipe(_ties_text(tiny_models))
    again, _ = parse_merge_recipe(recipe_yaml(recipe))
    assert again == recipe
    math_params = again.models[0].parameters if again.models else None
    assert math_params == {"weight": (0.2, 0.8), "density": (Filtered("mlp", 0.5), Filtered(None, 0.7))}


def test_merge_takes_a_parsed_recipe(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """The same recipe from a file and as an object: equal plans, identical tensors; the object's
    copy beside the weights is its YAML dump, which loads back to it."""
    text = _ties_text(tiny_models)
    recipe, _ = parse_merge_recipe(text)
    from_file = fusekit.merge(write_recipe(tmp_path / "r.yaml", text), tmp_path / "a", random_seed=3)
    from_object = fusekit.merge(recipe, tmp_path / "b", random_seed=3)
    assert [t.output for t in fusekit.plan_merge(recipe).tasks] == [t.output for t in from_file.plan.tasks]
    a, b = load_weights(from_file.out_dir), load_weights(from_object.out_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / RECIPE_COPY).read_text(encoding="utf-8") == text
    copied = (tmp_path / "b" / RECIPE_COPY).read_text(encoding="utf-8")
    assert copied == recipe_yaml(recipe) and parse_merge_recipe(copied)[0] == recipe


def test_a_parsed_recipe_passes_the_same_checks_as_a_file(tiny_models: dict[str, Path]) -> None:
    """A recipe built in code is checked as a file would be: a parameter no method takes is refused,
    and one the method does not take is refused under ``strict`` (a warning otherwise)."""
    def recipe(name: str) -> MergeRecipe:
        return MergeRecipe(merge_method="linear", models=[
            ModelEntry(model=str(tiny_models["math"]), parameters={"weight": 1.0, name: 0.5})])

    with pytest.raises(RecipeError, match="densty"):
        fusekit.plan_merge(recipe("densty"))
    with pytest.raises(RecipeError, match="density"):
        fusekit.plan_merge(recipe("density"), strict=True)
    assert fusekit.plan_merge(recipe("density")).tasks
