"""Model cards the Hub reads (issue 20, item 7): Hub ids only in ``base_model``, local inputs listed by
name, the recipe file that is written, ``merge``/``mergekit`` tags, a seed only when it matters."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import yaml
from conftest import write_recipe

import fusekit
from fusekit.io.card import model_card

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def front(card: str) -> dict[str, object]:
    match = re.match(r"\A---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    return yaml.safe_load(match.group(1))  # type: ignore[no-any-return]


def recipe(folder: Path, models: dict[str, Path], method: str) -> Path:
    params = "{weight: 0.5, density: 0.5}" if method != "linear" else "{weight: 0.5}"
    base = f"base_model: {models['base']}\n" if method != "linear" else ""
    return write_recipe(folder / f"{method}.yaml", f"merge_method: {method}\n{base}models:\n"
                        f"  - model: {models['math']}\n    parameters: {params}\n"
                        f"  - model: {models['code']}\n    parameters: {params}\n")


@pytest.mark.parametrize("method", ["dare_ties", "linear"])
def test_card_of_a_local_merge(method: str, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    result = fusekit.merge(recipe(tmp_path, tiny_models, method), tmp_path / "out", random_seed=17)
    card = (tmp_path / "out" / "README.md").read_text(encoding="utf-8")
    meta = front(card)
    assert "base_model" not in meta and "base_model_relation" not in meta  # no Hub ids to name
    assert {"merge", "mergekit", "fusekit"} <= set(meta["tags"])  # type: ignore[arg-type]
    about = meta["fusekit"]
    assert isinstance(about, dict)
    names = [Path(os.path.relpath(tiny_models[k], tmp_path)).as_posix()
             for k in (["base"] if method != "linear" else []) + ["math", "code"]]
    assert about["inputs"] == names
    for name in names:
        assert f"- `{name}` (" in card and "local folder" in card
    assert about["recipe"] == "mergekit_config.yml" and (tmp_path / "out" / "mergekit_config.yml").is_file()
    assert "`fusekit merge mergekit_config.yml OUT_DIR" in card and "recipe.yaml" not in card
    if method == "dare_ties":
        assert result.seed == about["random_seed"] == 17
        assert "`fusekit merge mergekit_config.yml OUT_DIR --random-seed 17`" in card
        assert "Random seed: `17`" in card
    else:
        assert result.seed is None and "random_seed" not in about
        assert "--random-seed" not in card and "Random seed" not in card


def test_hub_inputs_go_in_base_model_and_the_hub_parses_the_card() -> None:
    from huggingface_hub import ModelCard

    text = model_card(name="m", method="ties", models=["org/base", "/data/local-model", "org/math@v2"],
                      base="org/base", recipe_text="merge_method: ties\n", seed=None,
                      names={"/data/local-model": "../local-model"})
    card = ModelCard(text)
    assert card.data.base_model == ["org/base", "org/math"]
    assert all(HUB_ID.match(ref) for ref in card.data.base_model)
    assert card.data.base_model_relation == "merge"
    assert {"merge", "mergekit"} <= set(card.data.tags)
    assert card.data.to_dict()["fusekit"]["inputs"] == ["org/base", "../local-model", "org/math@v2"]
    assert "`../local-model` (local folder)" in text and "`org/base` (base, Hub model)" in text
    assert "/data/local-model" not in text


def test_extra_metadata_adds_tags_and_owns_the_relation() -> None:
    text = model_card(name="a", method="ties_svd", models=["org/base"], base="org/base",
                      recipe_text="x: 1\n", seed=3, recipe_file="fusekit_recipe.yml",
                      extra_metadata={"base_model": "org/base", "library_name": "peft", "tags": ["peft"]})
    meta = front(text)
    assert meta["base_model"] == "org/base" and "base_model_relation" not in meta
    assert {"merge", "mergekit", "peft"} <= set(meta["tags"])  # type: ignore[arg-type]
    assert "`fusekit merge fusekit_recipe.yml OUT_DIR --random-seed 3`" in text


@pytest.mark.parametrize(("gate_mode", "stochastic"), [("random", True), ("cheap_embed", False)])
def test_moe_cards_follow_the_same_rules(gate_mode: str, stochastic: bool, tiny_models: dict[str, Path],
                                         tmp_path: Path) -> None:
    from fusekit.moe import plan_moe
    from fusekit.moe.card import moe_card

    def prompts(text: str) -> str:
        return f"    positive_prompts: [{text}]\n" if gate_mode == "cheap_embed" else ""

    path = write_recipe(tmp_path / "moe.yaml", f"base_model: {tiny_models['base']}\ngate_mode: {gate_mode}\n"
                        f"experts:\n  - source_model: {tiny_models['math']}\n{prompts('sums')}"
                        f"  - source_model: {tiny_models['code']}\n{prompts('code')}")
    card = moe_card(plan_moe(path), name="moe", seed=41)
    meta = front(card)
    assert {"moe", "merge", "mergekit", "fusekit"} <= set(meta["tags"])  # type: ignore[arg-type]
    assert "base_model" not in meta
    about = meta["fusekit"]
    assert isinstance(about, dict) and about["recipe"] == "mergekit_moe_config.yml"
    assert about["inputs"] == [str(tiny_models[k]) for k in ("base", "math", "code")]
    assert "`fusekit moe mergekit_moe_config.yml OUT_DIR" in card
    assert ("--random-seed 41" in card) is stochastic and (about.get("random_seed") == 41) is stochastic
