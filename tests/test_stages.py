"""Multi-stage recipes: several merge recipes in one YAML file, later stages using earlier outputs.

Numbers are checked against float64 references computed here from the input checkpoints; the
graph, the order, the locks (an unchanged stage is not recomputed, a changed one rebuilds what reads
it), ``--stage``, ``fusekit plan`` and every bad-input case (one line naming the file:line and the
stage, exit 2, nothing written) are checked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import in_process_cli, load_weights, write_recipe

import fusekit
from fusekit.errors import FusekitError, LockMismatchError, RecipeError
from fusekit.merging import RECIPE_COPY
from fusekit.merging_stages import default_stages_dir, merge_stages
from fusekit.recipe.stages import load_stages, parse_stages

pytestmark = pytest.mark.usefixtures("one_torch_thread")
cli = pytest.fixture(in_process_cli)


def _two_stages(models: dict[str, Path], weight: float = 0.8, soup_math: float = 0.5) -> str:
    """``soup`` = linear(math, code); the unnamed last stage = task arithmetic of base + soup."""
    return (f"name: soup\nmerge_method: linear\nmodels:\n"
            f"  - model: {models['math']}\n    parameters: {{weight: {soup_math}}}\n"
            f"  - model: {models['code']}\n    parameters: {{weight: {1 - soup_math}}}\ndtype: float32\n"
            "---\n# the output\n"
            f"merge_method: task_arithmetic\nbase_model: {models['base']}\n"
            f"models:\n  - model: soup\n    parameters: {{weight: {weight}}}\ndtype: float32\n")


def _reference(models: dict[str, Path], weight: float, soup_math: float) -> dict[str, torch.Tensor]:
    """float64: base + weight · (soup − base), soup = soup_math · math + (1 − soup_math) · code."""
    base, math, code = (load_weights(models[k]) for k in ("base", "math", "code"))
    out = {}
    for name, b in base.items():
        soup = soup_math * math[name].double() + (1 - soup_math) * code[name].double()
        out[name] = b.double() + weight * (soup - b.double())
    return out


def _close_to(folder: Path, reference: dict[str, torch.Tensor]) -> None:
    got = load_weights(folder)
    assert set(got) == set(reference)
    for name, value in reference.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)


def test_stages_run_in_order_and_the_last_is_the_output(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "multi.yaml", _two_stages(tiny_models))
    out = tmp_path / "merged"
    result = fusekit.merge(recipe, out)
    assert [name for name, _ in result.stages] == ["soup", "final"]
    assert result.out_dir == out and (out / "fusekit.lock").is_file()
    soup = default_stages_dir(out) / "soup"
    assert (soup / "fusekit.lock").is_file() and not (out / "soup").exists()
    _close_to(out, _reference(tiny_models, 0.8, 0.5))
    assert (out / RECIPE_COPY).read_text(encoding="utf-8").startswith("# the output\nmerge_method")
    from transformers import AutoModelForCausalLM  # OUT_DIR is an ordinary, loadable model

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2


def test_locks_skip_unchanged_stages_and_rebuild_dependants(tiny_models: dict[str, Path],
                                                            tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "multi.yaml", _two_stages(tiny_models))
    out = tmp_path / "merged"
    fusekit.merge(recipe, out)
    again = fusekit.merge(recipe, out, locked=True)
    assert [r.up_to_date for _, r in again.stages] == [True, True]
    write_recipe(recipe, _two_stages(tiny_models, weight=0.6))  # only the last stage changed
    last_only = fusekit.merge(recipe, out, overwrite=True)
    assert [r.up_to_date for _, r in last_only.stages] == [True, False]
    _close_to(out, _reference(tiny_models, 0.6, 0.5))
    write_recipe(recipe, _two_stages(tiny_models, weight=0.6, soup_math=0.25))  # the first changed
    with pytest.raises(FusekitError, match="out of date.*--overwrite"):
        fusekit.merge(recipe, out)  # the output is never replaced unasked ...
    both = fusekit.merge(recipe, out, overwrite=True)
    assert [r.up_to_date for _, r in both.stages] == [True, False]  # ... the soup was rebuilt above
    _close_to(out, _reference(tiny_models, 0.6, 0.25))


def test_stage_option_builds_a_stage_and_what_it_needs(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    three = (_two_stages(tiny_models).replace("# the output\n", "name: boosted\n")
             + f"---\nname: last\nmerge_method: linear\nmodels:\n  - model: boosted\n"
               f"  - model: {tiny_models['base']}\ndtype: float32\n")
    recipe = write_recipe(tmp_path / "multi.yaml", three)
    out, stages = tmp_path / "merged", tmp_path / "elsewhere"
    first = merge_stages(recipe, out, stage="soup", stages_dir=stages)
    assert [n for n, _ in first.stages] == ["soup"] and not (stages / "boosted").exists()
    second = merge_stages(recipe, out, stage="boosted", stages_dir=stages, force=True)
    assert [(n, r.up_to_date) for n, r in second.stages] == [("soup", True), ("boosted", False)]
    assert second.out_dir == stages / "boosted" and not out.exists()
    _close_to(stages / "boosted", _reference(tiny_models, 0.8, 0.5))
    with pytest.raises(RecipeError, match=r"no stage of that name; did you mean 'boosted'\?"):
        merge_stages(recipe, out, stage="boosteb")


def test_a_failing_stage_leaves_the_earlier_ones_and_no_output(tiny_models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    bad = (_two_stages(tiny_models).split("---")[0] + "---\nmerge_method: passthrough\n"
           "slices:\n  - sources:\n      - model: soup\n        layer_range: [0, 9]\n")
    out = tmp_path / "merged"
    with pytest.raises(FusekitError):
        fusekit.merge(write_recipe(tmp_path / "multi.yaml", bad), out)
    assert not out.exists() and (default_stages_dir(out) / "soup" / "fusekit.lock").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_locked_needs_every_stage_lock(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "multi.yaml", _two_stages(tiny_models))
    with pytest.raises((LockMismatchError, FusekitError)):
        fusekit.merge(recipe, tmp_path / "merged", locked=True)
    assert not (tmp_path / "merged").exists()


def test_one_document_with_a_name_is_a_plain_recipe(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    text = _two_stages(tiny_models).split("---")[0]
    result = fusekit.merge(write_recipe(tmp_path / "one.yaml", text), tmp_path / "out")
    assert result.stages == () and result.plan.recipe.name == "soup"


def test_plan_prints_the_graph_then_each_stage(tiny_models: dict[str, Path], tmp_path: Path,
                                               cli: Callable[..., tuple[int, str, str]]) -> None:
    recipe = write_recipe(tmp_path / "multi.yaml", _two_stages(tiny_models))
    code, text, _ = cli("plan", str(recipe))
    assert code == 0
    assert "2 stages, built in this order:" in text and "2. final" in text and "uses: soup" in text
    assert "merge method: linear" in text and "not planned: it uses stage soup" in text
    fusekit.merge(recipe, tmp_path / "merged")
    code, text, _ = cli("plan", str(recipe), "--out-dir", str(tmp_path / "merged"), "--json")
    rows = json.loads(text)["stages"]
    assert code == 0 and [(r["name"], r["uses"], r["output"]) for r in rows] == [
        ("soup", [], False), ("final", ["soup"], True)]
    assert rows[1]["plan"]["merge_method"] == "task_arithmetic" and rows[1]["not_built"] == []


def test_merge_cli_reports_every_stage(tiny_models: dict[str, Path], tmp_path: Path,
                                       cli: Callable[..., tuple[int, str, str]]) -> None:
    recipe = write_recipe(tmp_path / "multi.yaml", _two_stages(tiny_models))
    out = tmp_path / "merged"
    code, text, _ = cli("merge", str(recipe), str(out), "--json")
    summary = json.loads(text)
    assert code == 0 and summary["out_dir"] == str(out)
    assert [s["stage"] for s in summary["stages"]] == ["soup", "final"]
    code, text, _ = cli("merge", str(recipe), str(out), "--stage", "soup")
    assert code == 0 and "stage 1/1 soup: up to date" in text


M = "merge_method: linear\nmodels:\n  - model: {}\n"
BAD = {  # name: (recipe text, what the one-line error says, the line it names)
    "unknown stage": ("name: a\n" + M.format("x/y") + "---\nname: b\n" + M.format("aa"),
                      "fix the name; did you mean 'a'? (in stage 'b')", 9),
    "later stage": ("name: a\n" + M.format("b") + "---\nname: b\n" + M.format("x/y"),
                    "stage 'b' comes later in the file", 4),
    "cycle": ("name: a\n" + M.format("a") + "---\nname: b\n" + M.format("x/y"),
              "stages form a cycle: a → a", 1),
    "two-stage cycle": ("name: a\n" + M.format("b") + "---\nname: b\n" + M.format("a"),
                        "stages form a cycle: a → b → a", 1),
    "duplicate": ("name: a\n" + M.format("x/y") + "---\nname: a\n" + M.format("a"),
                  "stage 'a' is already the name of the stage on line 1", 6),
    "unnamed": (M.format("x/y") + "---\nname: b\n" + M.format("x/y"), "document 1 has no 'name'", 1),
    "not a mapping": ("name: a\n" + M.format("x/y") + "---\n- 1\n- 2\n", "document 2 is not a merge", 6),
    "moe": ("name: a\n" + M.format("x/y") + "---\nname: b\nbase_model: a\nexperts: []\n",
            "stage 'b' is an MoE recipe", 6),
    "bad key": ("name: a\n" + M.format("x/y") + "---\nname: b\n" + M.format("a") + "weigth: 1\n",
                "unknown key 'weigth'", 10),
    "bad name": ("name: a/b\n" + M.format("x/y") + "---\nname: b\n" + M.format("x/y"), "stage name", 1),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_bad_stages_are_one_line_naming_the_line(case: str) -> None:
    text, message, line = BAD[case]
    with pytest.raises(RecipeError) as info:
        parse_stages(text, "multi.yaml")
    error = str(info.value)
    assert "\n" not in error and message in error and f"multi.yaml:{line}:" in error, error
    assert "stage" in error


def test_a_bad_stage_exits_2_and_writes_nothing(tmp_path: Path, tiny_models: dict[str, Path],
                                                cli: Callable[..., tuple[int, str, str]]) -> None:
    text = _two_stages(tiny_models).replace("model: soup", "model: soupp")
    recipe = write_recipe(tmp_path / "multi.yaml", text)
    code, _, err = cli("merge", str(recipe), str(tmp_path / "merged"))
    assert code == 2 and "multi.yaml:14:5" in err and "did you mean 'soup'?" in err
    assert len(err.strip().splitlines()) == 1 and sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]
    missing = _two_stages(tiny_models).replace(str(tiny_models["base"]), str(tmp_path / "gone"))
    code, _, err = cli("merge", str(write_recipe(recipe, missing)), str(tmp_path / "merged"))
    assert code == 2 and "gone" in err and "(in stage 'final'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yaml"]  # the soup did not run first


def test_the_shipped_example_loads() -> None:
    stages = load_stages(Path(__file__).resolve().parent.parent / "configs" / "multistage.yaml")
    assert [(s.label, s.uses) for s in stages.stages] == [
        ("soup", ()), ("boosted", ("soup",)), ("final", ("boosted",))]
