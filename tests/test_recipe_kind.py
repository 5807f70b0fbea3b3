"""The right command for the recipe: kind detection from top-level keys, one line naming the command
a recipe of another kind is for, problem lists one per line, and merge-style ``models:`` entries in
ensemble recipes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import in_process_cli

from fusekit.ensemble.recipe import parse_ensemble_recipe
from fusekit.errors import RecipeError
from fusekit.recipe import parse_merge_recipe
from fusekit.recipe.kind import SIGNATURES, file_kind, recipe_kind
from fusekit.recipe.load import MAX_LISTED_PROBLEMS, join_problems

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"

MOE = "base_model: m/base\ngate_mode: random\nexperts:\n  - source_model: m/a\n  - source_model: m/b\n"
ROUTE = "models: [{model: m/a, cost: 1}, {model: m/b, cost: 3}]\ndata: train.jsonl\nrouter: knn\n"
ENSEMBLE = "method: prob_avg\nmodels:\n  - model: m/a\n  - model: m/b\n"
MERGE = ("merge_method: linear\nmodels:\n  - model: m/a\n    parameters: {weight: 0.25}\n"
         "  - model: m/b\n    parameters: {weight: 0.75}\n")
RECIPES = {"moe": MOE, "route": ROUTE, "ensemble": ENSEMBLE, "merge": MERGE}
# (command run on the recipe, the kind it reads, what its error must name for each other kind)
COMMANDS = {
    "merge": (["merge", "{path}", "out"], "a merge recipe"),
    "plan": (["plan", "{path}"], "a merge recipe"),
    "moe": (["moe", "{path}", "out"], "an MoE recipe"),
    "ensemble check": (["ensemble", "check", "{path}"], "an ensemble recipe"),
    "route build": (["route", "build", "{path}", "out"], "a router recipe"),
}
RUNS_WITH = {"merge": ("merge", "plan"), "moe": ("moe", "plan"), "ensemble": ("ensemble check",),
             "route": ("route build",)}
FOR = {"merge": "fusekit merge {path} OUT_DIR", "moe": "fusekit moe {path} OUT_DIR",
       "ensemble": "fusekit ensemble score {path}", "route": "fusekit route build {path} OUT_DIR"}


def _config_kind(path: Path) -> str | None:
    """What a recipe in configs/ is by where it lives (None: a CI workflow, not a recipe)."""
    folder = path.relative_to(CONFIGS).parts[0]
    if folder in ("ensemble", "route", "moe", "serve"):
        return folder
    first = next(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    if folder == "tune":  # a merge or an ensemble recipe with search spaces
        return "ensemble" if "method" in first else "merge"
    return None if "jobs" in first else "merge"


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_recipe_is_recognised(path: Path) -> None:
    expected = _config_kind(path)
    kind = file_kind(path)
    if expected is None:
        assert kind is None
        return
    assert kind is not None and kind.name == expected
    documents = path.read_text(encoding="utf-8").count("\n---")
    assert (kind.stages > 1) == (documents > 0)
    assert kind.keys or kind.stages > 1  # told by its own keys, not guessed


def test_kind_from_keys() -> None:
    assert recipe_kind({"merge_method": "linear", "experts": []}) == recipe_kind({"merge_method": "x"})
    assert recipe_kind({"slices": []}).name == "merge"  # type: ignore[union-attr]
    assert recipe_kind({"models": [], "router": "knn", "data": "d"}).keys == ("router", "data")  # type: ignore[union-attr]
    weak = recipe_kind({"models": [{"model": "a"}]})
    assert weak is not None and (weak.name, weak.keys) == ("ensemble", ())
    assert recipe_kind({"experts": [], "method": "prob_avg"}) is None  # two kinds: ambiguous
    assert recipe_kind({"dtype": "float32"}) is None and recipe_kind(["a"]) is None
    signs = [key for keys in SIGNATURES.values() for key in keys]
    assert len(signs) == len(set(signs)), "a signature key belongs to one kind only"


@pytest.mark.parametrize(("kind", "command"), [(k, c) for k in sorted(RECIPES) for c in sorted(COMMANDS)
                                                if c not in RUNS_WITH[k]])
def test_a_recipe_of_another_kind_names_its_command(kind: str, command: str, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    Path("r.yaml").write_text(RECIPES[kind], encoding="utf-8")
    args, reads = COMMANDS[command]
    code, out, err = in_process_cli(capsys)(*[a.format(path="r.yaml") for a in args])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("fusekit: error: r.yaml:") and "Traceback" not in err
    assert FOR[kind].format(path="r.yaml") in err and f"not {reads}" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]  # nothing written


def test_several_problems_one_per_line_in_file_order() -> None:
    text = ("merge_method: linear\ndtype: float8\nmodels:\n  - {model: a, parameters: {weight: 1}, "
            "extra: 1}\n  - {model: b, paramters: {weight: 1}}\n")
    with pytest.raises(RecipeError) as info:
        parse_merge_recipe(text, "r.yaml")
    lines = str(info.value).splitlines()
    assert lines[0] == "3 problems in r.yaml:"
    assert [line.split()[0] for line in lines[1:]] == ["r.yaml:2:1", "r.yaml:4:41", "r.yaml:5:16"]
    assert all(line.startswith("  r.yaml:") for line in lines[1:])


def test_a_long_problem_list_is_cut_and_counted() -> None:
    lines = [f"r.yaml:{n}:1 models[{n}]: bad" for n in range(50, 0, -1)]
    message = join_problems(lines, "r.yaml").splitlines()
    assert message[0] == "50 problems in r.yaml:" and len(message) == MAX_LISTED_PROBLEMS + 2
    assert message[1] == "  r.yaml:1:1 models[1]: bad" and message[-2] == "  r.yaml:20:1 models[20]: bad"
    assert message[-1] == f"  ... and {50 - MAX_LISTED_PROBLEMS} more; fix these and run again"
    assert join_problems(["one", "one"], "r.yaml") == "one"


def test_merge_entries_work_unchanged_in_an_ensemble() -> None:
    merge = yaml.safe_load((CONFIGS / "linear.yaml").read_text(encoding="utf-8"))
    text = yaml.safe_dump({"method": "prob_avg", "models": merge["models"]})
    recipe, _ = parse_ensemble_recipe(text, "e.yaml")
    given = [entry["parameters"]["weight"] for entry in merge["models"]]
    assert recipe.weights() == pytest.approx([w / sum(given) for w in given], abs=1e-15)
    assert recipe.refs() == [entry["model"] for entry in merge["models"]]
    mixed, _ = parse_ensemble_recipe("models:\n  - {model: a, revision: v2, parameters: {weight: 3}}\n"
                                     "  - {model: b, weight: 1}\n")
    assert mixed.weights() == [0.75, 0.25] and mixed.refs() == ["a@v2", "b"]


@pytest.mark.parametrize(("entry", "culprit"), [
    ("{model: a, weight: 1, parameters: {weight: 2}}", "models[0]: the weight is given twice"),
    ("{model: a, parameters: {weight: 0.5, density: 0.5}}", "models[0].parameters.density: unknown key"),
    ("{model: a, parameters: {weight: 0}}", "models[0].parameters.weight: Input should be greater than 0"),
    ("{model: a, parameters: {weight: [0, 1]}}", "models[0].parameters.weight: Input should be a valid"),
])
def test_merge_entries_an_ensemble_cannot_take(entry: str, culprit: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_ensemble_recipe(f"models:\n  - {entry}\n", "e.yaml")
    message: Any = str(info.value)
    assert message.startswith("e.yaml:2:") and culprit in message and "\n" not in message, message
