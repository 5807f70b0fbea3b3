"""mergekit semantics that are easy to get wrong: number formats, step lists, post weights, heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY, load_weights, write_recipe

import fusekit
from fusekit.demo import build_demo_models
from fusekit.recipe import parse_merge_recipe
from fusekit.recipe.params import evaluate


def test_exponent_without_a_dot_is_a_number_in_gradients() -> None:
    recipe, _ = parse_merge_recipe(
        "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1e-1, 5E-1]}\n")
    assert recipe.models is not None and recipe.models[0].parameters is not None
    assert recipe.models[0].parameters["weight"] == (0.1, 0.5)


@pytest.mark.parametrize(("t", "expected"), [(0.0, True), (0.4, True), (0.5, False), (1.0, False)])
def test_boolean_lists_step_instead_of_interpolating(t: float, expected: bool) -> None:
    # entry floor(t · (n − 1)) of [true, false, false]
    assert evaluate((True, False, False), "x", t) is expected


def test_post_weights_come_from_as_many_last_slice_sources_as_the_first_slice_has(
        tiny_models: dict[str, Path], tmp_path: Path) -> None:
    base, math, code = (str(tiny_models[k]) for k in ("base", "math", "code"))
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: linear
slices:
  - sources:
      - {{model: {base}, layer_range: [0, 1], parameters: {{weight: 1.0}}}}
  - sources:
      - {{model: {math}, layer_range: [1, 2], parameters: {{weight: 1.0}}}}
      - {{model: {code}, layer_range: [1, 2], parameters: {{weight: 1.0}}}}
""")
    fusekit.merge(recipe, tmp_path / "out")
    out, math_w = load_weights(tmp_path / "out"), load_weights(tiny_models["math"])
    for name in ("model.norm.weight", "lm_head.weight"):
        assert torch.equal(out[name], math_w[name])
    code_w = load_weights(tiny_models["code"])
    expected = (math_w["model.layers.1.mlp.up_proj.weight"].double()
                + code_w["model.layers.1.mlp.up_proj.weight"].double()) / 2
    torch.testing.assert_close(out["model.layers.1.mlp.up_proj.weight"].double(), expected,
                               rtol=1e-6, atol=1e-7)


def test_tied_base_with_untied_models_gets_a_merged_head_and_an_untied_config(
        tmp_path: Path) -> None:
    tied = build_demo_models(tmp_path / "tied", names=("base",), tie_word_embeddings=True, **TINY)
    untied = build_demo_models(tmp_path / "untied", names=("base", "math"), **TINY)
    base, math = tied["base"], untied["math"]
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {math}, parameters: {{weight: 0.5}}}}
""")
    fusekit.merge(recipe, tmp_path / "out")
    out = load_weights(tmp_path / "out")
    embed = load_weights(base)["model.embed_tokens.weight"].double()
    head = load_weights(math)["lm_head.weight"].double()
    torch.testing.assert_close(out["lm_head.weight"].double(), embed + 0.5 * (head - embed),
                               rtol=1e-6, atol=1e-7)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False


def test_all_tied_inputs_give_no_head(tied_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: linear
models:
  - {{model: {tied_models['base']}, parameters: {{weight: 1}}}}
  - {{model: {tied_models['math']}, parameters: {{weight: 1}}}}
""")
    fusekit.merge(recipe, tmp_path / "out")
    assert "lm_head.weight" not in load_weights(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
