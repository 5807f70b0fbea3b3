"""Tune recipes: search spaces, the ``tune:`` block, their errors, and the ask/tell optimisers.

Nothing here runs a model: a tune recipe is checked, its points turned into plain recipes and the
optimisers driven with made-up scores.
"""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import in_process_cli

from fusekit.errors import FusekitError, RecipeError
from fusekit.tune.optimizers import CmaSearch, GridSearch, RandomSearch, grid_sizes, make_optimizer
from fusekit.tune.space import METHODS, Dimension, SearchSpace
from fusekit.tune.spec import TuneSpec, check_data_files, parse_duration, parse_tune_spec

ROOT = Path(__file__).resolve().parent.parent

RECIPE = """\
merge_method: {search: [linear, ties, dare_ties]}
base_model: base
models:
  - model: python
    parameters:
      weight: {search: [0, 1]}
  - model: c
    parameters:
      weight: {search: [0, 1], groups: 3}
  - model: prose
    parameters:
      weight: {search: [0.1, 10], scale: log}
tune:
  data: [data.txt, more.jsonl]
  test: mixed.txt
  optimizer: cma
  budget: {evaluations: 40, time: 1h30m}
  seed: 7
"""

TIES = """\
merge_method: ties
base_model: base
models:
  - model: python
    parameters: {weight: 0.5, density: {search: [0.1, 1], scale: log}}
  - model: c
    parameters: {weight: 0.5, density: 0.5}
parameters:
  lambda: {search: [0.5, 2]}
tune:
  data: data.txt
  optimizer: OPTIMIZER
  budget: {evaluations: EVALUATIONS}
"""


def spec_of(text: str, name: str = "r.yaml") -> TuneSpec:
    return parse_tune_spec(text, name)


def ties(optimizer: str = "cma", evaluations: int = 30) -> TuneSpec:
    return spec_of(TIES.replace("OPTIMIZER", optimizer).replace("EVALUATIONS", str(evaluations)))


# -- search spaces --------------------------------------------------------------------------------------


def test_search_spaces_become_dimensions_in_recipe_order() -> None:
    spec = spec_of(RECIPE)
    dims = spec.space.dims
    assert [d.path for d in dims] == ["merge_method", "models[0].parameters.weight",
                                      "models[1].parameters.weight[0]", "models[1].parameters.weight[1]",
                                      "models[1].parameters.weight[2]", "models[2].parameters.weight"]
    assert dims[0].choices == ("linear", "ties", "dare_ties")
    assert (dims[5].low, dims[5].high, dims[5].scale) == (0.1, 10.0, "log")
    assert spec.kind == "merge" and "tune" not in spec.base_recipe
    assert spec.base_recipe["models"][0]["parameters"]["weight"] == {"search": [0, 1]}


def test_recipe_for_fills_values_groups_become_a_gradient_and_rounds_to_six_digits() -> None:
    space = spec_of(RECIPE).space
    x = [0.5, 1 / 3, 0.0, 0.25, 1.0, 0.5]
    recipe = space.recipe_for(x)
    assert recipe["merge_method"] == "ties"  # bin floor(0.5 * 3) = 1
    assert recipe["base_model"] == "base" and "tune" not in recipe
    models = recipe["models"]
    assert models[0]["parameters"]["weight"] == 0.333333  # 1/3 at 6 significant digits
    assert models[1]["parameters"]["weight"] == [0.0, 0.25, 1.0]
    assert models[2]["parameters"]["weight"] == pytest.approx(1.0, abs=0)  # sqrt(0.1 * 10), log scale
    assert "search" not in repr(recipe)


def test_a_candidate_is_a_recipe_fusekit_merge_accepts() -> None:
    from fusekit.recipe import parse_merge_recipe
    from fusekit.recipe.params import evaluate

    space = spec_of(RECIPE).space
    recipe = space.recipe_for([0.9, 0.2, 0.1, 0.5, 0.9, 0.3])
    import yaml

    parsed = parse_merge_recipe(yaml.safe_dump(recipe), strict=True)[0]
    assert parsed.merge_method == "dare_ties"
    gradient = parsed.models[1].parameters["weight"]  # type: ignore[index]
    assert evaluate(gradient, "x", 0.25) == pytest.approx(0.5 * 0.1 + 0.5 * 0.5)


def test_log_and_linear_scales_against_the_formula() -> None:
    log = Dimension("w", 0.01, 100.0, "log")
    for u in (0.0, 0.3, 0.5, 0.77, 1.0):
        expected = math.exp(math.log(0.01) + u * (math.log(100.0) - math.log(0.01)))
        assert log.value(u) == pytest.approx(expected, rel=1e-5)  # 6 significant digits
        assert log.unit(log.value(u)) == pytest.approx(u, abs=1e-6)
    linear = Dimension("w", -1.0, 3.0)
    assert [linear.value(u) for u in (0.0, 0.25, 1.0, 1.5)] == [-1.0, 0.0, 3.0, 3.0]  # clipped outside


def test_a_searched_method_without_a_base_leaves_base_model_out() -> None:
    space = spec_of(RECIPE).space
    linear = space.recipe_for([0.0, 0.5, 0.5, 0.5, 0.5, 0.5])
    assert linear["merge_method"] == "linear" and "base_model" not in linear


def test_keys_are_stable_and_equal_exactly_when_the_recipes_are() -> None:
    space = spec_of(RECIPE).space
    again = spec_of(RECIPE.replace("  seed: 7\n", "  seed: 8\n  workers: 2\n")).space
    x = [0.5, 0.2, 0.1, 0.5, 0.9, 0.3]
    assert space.key(x) == again.key(x) and len(space.key(x)) == 16
    same_bin = [0.6, *x[1:]]  # still ties
    assert space.key(same_bin) == space.key(x)
    assert space.key([0.9, *x[1:]]) != space.key(x)
    assert space.key([0.5, 0.2 + 1e-9, *x[2:]]) == space.key(x)  # equal after rounding
    assert space.key([0.5, 0.21, *x[2:]]) != space.key(x)


def test_the_default_point_is_the_hand_set_recipe() -> None:
    space = spec_of(RECIPE).space
    recipe = space.recipe_for(space.default_point())
    assert recipe["merge_method"] == "linear"  # the first method listed
    assert [m["parameters"]["weight"] for m in recipe["models"]] == [0.5, [0.5, 0.5, 0.5], 1.0]


def test_search_in_a_filter_entry_and_a_gradient_knot() -> None:
    text = """\
merge_method: linear
models:
  - model: a
    parameters:
      weight: [{filter: self_attn, value: {search: [0, 2]}}, {value: 1}]
  - model: b
    parameters:
      weight: [0.2, {search: [0, 1]}, 0.8]
tune: {data: d.txt, budget: {evaluations: 5}, optimizer: random}
"""
    space = spec_of(text).space
    assert [d.path for d in space.dims] == ["models[0].parameters.weight[0].value",
                                            "models[1].parameters.weight[1]"]
    recipe = space.recipe_for([0.25, 0.5])
    filtered = [{"filter": "self_attn", "value": 0.5}, {"value": 1}]
    assert recipe["models"][0]["parameters"]["weight"] == filtered
    assert recipe["models"][1]["parameters"]["weight"] == [0.2, 0.5, 0.8]


def test_tune_settings_are_read_and_paths_made_absolute() -> None:
    settings = spec_of(RECIPE).settings
    assert settings.data == (str(Path("data.txt").resolve()), str(Path("more.jsonl").resolve()))
    assert settings.test == (str(Path("mixed.txt").resolve()),)
    assert (settings.optimizer, settings.evaluations, settings.wall_time_s, settings.seed) == ("cma", 40,
                                                                                             5400.0, 7)
    assert (settings.workers, settings.population, settings.per_layer) == (1, None, False)
    assert [parse_duration(v) for v in (90, "90s", "30m", "2h", "1d", "1.5m")] == [90, 90, 1800, 7200,
                                                                                   86400, 90]


def test_an_ensemble_recipe_searches_its_member_weights() -> None:
    text = "models: [{model: a}, {model: b, parameters: {weight: 2}}]\nmethod: prob_avg\n" \
           "tune: {data: d.txt, budget: {evaluations: 3}}\n"
    spec = spec_of(text)
    assert spec.kind == "ensemble"
    assert [d.path for d in spec.space.dims] == ["models[0].weight", "models[1].parameters.weight"]
    recipe = spec.space.recipe_for([0.0, 1.0])
    assert recipe["models"] == [{"model": "a", "weight": 0.01}, {"model": "b", "parameters": {"weight": 1.0}}]
    explicit = spec_of("models: [{model: a, weight: {search: [0.5, 4]}}, {model: b}]\nmethod: logit_avg\n"
                       "tune: {data: d.txt, budget: {evaluations: 3}}\n")
    assert [(d.path, d.low, d.high) for d in explicit.space.dims] == [("models[0].weight", 0.5, 4.0)]


# -- errors ---------------------------------------------------------------------------------------------


def _error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        spec_of(text)
    return str(info.value)


def _merge(models: str, tune: str = "{data: d.txt, budget: {evaluations: 10}}", method: str = "ties",
           extra: str = "base_model: base\n") -> str:
    return f"merge_method: {method}\n{extra}models:\n{models}tune: {tune}\n"


ONE = "  - model: a\n    parameters: {weight: 1, density: %s}\n  - model: b\n    parameters: {weight: 1}\n"


@pytest.mark.parametrize(("text", "where", "fragment"), [
    (_merge(ONE % "{search: [0.9, 0.1]}"), "r.yaml:5:39", "bounds are reversed: low 0.9 is above high 0.1"),
    (_merge(ONE % "{search: [0.1, 1.5]}"), "r.yaml:5:39", "leave the valid range of density in ties, [0, 1]"),
    (_merge(ONE % "{search: [0, 1], scale: log}"), "r.yaml:5:39", "a log scale needs low > 0"),
    (_merge(ONE % "{search: [0.5, 0.5]}"), "r.yaml:5:39", "write the value itself"),
    (_merge(ONE % "{search: [0.1, 1], scael: log}"), "r.yaml:5:57", "unknown key 'scael' in a search space; "
                                                                     "did you mean 'scale'?"),
    (_merge(ONE % "{search: [0.1, 1], groups: 0}"), "r.yaml:5:57", "groups must be a whole number"),
    (_merge(ONE % "{search: [a, b]}"), "r.yaml:5:39", "two finite numbers"),
    (_merge(ONE % "0.5", method="{search: [linear, ties]}"), "r.yaml:5:29",
     "'density' is not a parameter of linear, one of the searched methods"),
    (_merge(ONE % "{search: [0.1, 1]}", method="{search: [linear, ties]}"), "r.yaml:5:29",
     "'density' is not a parameter of linear (linear takes: normalize, weight)"),
    (_merge(ONE % "0.5", method="{search: [ties, dare_ties]}", extra=""), "r.yaml:1:1",
     "ties and dare_ties (searched) need a base model"),
    (_merge(ONE % "0.5", method="{search: [ties, tise]}"), "r.yaml:1:", "unknown merge method 'tise'"),
    (_merge(ONE % "0.5", extra="base_model: base\nparameters: {normalize: {search: [0, 1]}}\n"),
     "r.yaml:3:", "'normalize' is not a number"),
    (_merge(ONE % "0.5", extra="base_model: base\ndtype: {search: [0, 1]}\n"), "r.yaml:3:",
     "a search space must stand for a number in parameters"),
    (_merge(ONE % "0.5"), "r.yaml:", "there is nothing to search"),
    (_merge(ONE % "0.1", tune="{data: d.txt, budget: {evaluations: 0}}"), "r.yaml:8:30",
     "tune.budget.evaluations: must be at least 1, got 0"),
    (_merge(ONE % "0.1", tune="{data: d.txt, budget: {time: 0}}"), "r.yaml:8:30",
     "tune.budget.time: must be at least 1 second"),
    (_merge(ONE % "0.1", tune="{data: d.txt, budget: {}}"), "r.yaml:8:21", "tune.budget: give evaluations"),
    (_merge(ONE % "0.1", tune="{data: d.txt}"), "r.yaml:8:1", "tune: required key 'budget' is missing"),
    (_merge(ONE % "0.1", tune="{data: [], budget: {evaluations: 3}}"), "r.yaml:8:8",
     "tune.data: must be a file or a list of files"),
    (_merge(ONE % "0.1", tune="{data: d.txt, optimiser: cma, budget: {evaluations: 3}}"), "r.yaml:8:21",
     "unknown key 'optimiser'; did you mean 'optimizer'?"),
    (_merge(ONE % "{search: [0.1, 1]}", tune="{data: d.txt, optimizer: adam, budget: {evaluations: 3}}"),
     "r.yaml:5:", "optimizer adam learns weight and lambda only"),
    (_merge("  - model: a\n    parameters: {weight: {search: [0, 1]}}\n", method="{search: [linear, ties]}",
            tune="{data: d.txt, optimizer: adam, budget: {evaluations: 3}}"),
     "r.yaml:1:1", "optimizer adam cannot search merge_method"),
    (_merge("  - model: a\n", method="slerp", extra="base_model: b\nparameters: {t: {search: [0, 1]}}\n",
            tune="{data: d.txt, optimizer: adam, budget: {evaluations: 3}}"),
     "r.yaml:6:", "tune.optimizer: optimizer adam needs merged weights that are differentiable"),
    (_merge(ONE % "{search: [0.1, 1]}", tune="{data: d.txt, per_layer: true, budget: {evaluations: 3}}"),
     "r.yaml:8:21", "per_layer applies to optimizer adam only"),
    (_merge(ONE % "{search: [0.1, 1]}", tune="{data: d.txt, optimizer: grid, budget: {evaluations: 1}}"),
     "r.yaml:8:47", "a grid over 1 dimension needs at least 2 evaluations"),
    (_merge(ONE % "{search: [0.1, 1]}", tune="{data: d.txt, optimizer: grid, budget: {time: 1h}}"),
     "r.yaml:8:38", "optimizer grid needs budget.evaluations"),
    (_merge("  - model: a\n    parameters: {weight: 1, density: {search: [0.1, 1]}}\n", method="della"),
     "r.yaml:5:29", "della needs density ± epsilon inside (0, 1), and density in [0.1, 1] with epsilon up to "
                    "0.15 leaves it"),
    (_merge(ONE % "[0.2, {search: [0.1, 1], groups: 2}]"), "r.yaml:5:", "groups cannot apply to one knot"),
    ("models: [{model: a, weight: {search: [0, 1]}}]\nmethod: prob_avg\n"
     "tune: {data: d.txt, budget: {evaluations: 3}}\n", "r.yaml:1:", "valid range of an ensemble member's "
                                                                    "weight, (0, inf); keep both inside it"),
    ("experts: [{source_model: a}]\nbase_model: b\ntune: {data: d.txt, budget: {evaluations: 3}}\n",
     "r.yaml:3:1", "tune: applies to merge and ensemble recipes, and this is an MoE recipe"),
])
def test_every_mistake_is_one_line_naming_file_line_and_fix(text: str, where: str, fragment: str) -> None:
    message = _error(text)
    assert "\n" not in message, message
    assert message.startswith(where) and fragment in message, message


def test_the_schema_checks_the_rest_of_the_recipe_and_problems_come_together() -> None:
    message = _error(_merge(ONE % "{search: [0.1, 0.9]}").replace("base_model: base", "base_model: base\n"
                                                                   "paramters: {}"))
    assert message == "r.yaml:3:1 paramters: unknown key 'paramters'; did you mean 'parameters'?"
    message = _error(_merge(ONE % "{search: [0.1, 0.9]}").replace("- model: b", "- model: b\n    wieght: 2"))
    assert message.startswith("r.yaml:7:5 models[1].wieght: unknown key 'wieght'"), message
    both = _error(_merge(ONE % "{search: [0.9, 0.1]}").replace("weight: 1}", "weight: {search: [2, 1]}}"))
    assert both.startswith("2 problems in r.yaml:") and "r.yaml:5:" in both and "r.yaml:7:" in both


def test_della_bounds_that_keep_density_plus_minus_epsilon_inside_the_unit_interval_pass() -> None:
    models = "  - model: a\n    parameters: {weight: 1, density: 0.5, epsilon: {search: [0.1, 0.4]}}\n"
    assert spec_of(_merge(models, method="della")).space.dims[0].high == 0.4


def test_a_recipe_without_a_tune_block_is_refused() -> None:
    assert "there is no tune: block" in _error("merge_method: linear\nmodels: [{model: a}]\n")


# -- the table of parameter ranges agrees with the operators -------------------------------------------


def test_the_range_table_agrees_with_the_operators_parameter_models() -> None:
    from pydantic import ValidationError

    from fusekit.ops import get_method, method_names
    from fusekit.recipe.checks import _adapter

    assert sorted(METHODS) == method_names()
    for name in method_names():
        method, info = get_method(name), METHODS[name]
        assert info.base == method.base, name
        assert set(info.params) == set(method.parameter_names()), name
        for param, valid in info.params.items():
            adapter = _adapter(name, param)
            if valid is None:
                with pytest.raises(ValidationError):
                    adapter.validate_python(0.5)  # a bool or int setting refuses a fraction
                continue
            for end, open_, step in ((valid.low, valid.low_open, -1e-6), (valid.high, valid.high_open, 1e-6)):
                inside = end - 5 * step if math.isfinite(end) else -step * 1e12 * (1 if end < 0 else -1)
                assert adapter.validate_python(inside) == pytest.approx(inside), (name, param)
                if math.isfinite(end):
                    if not open_:
                        adapter.validate_python(end)
                    with pytest.raises(ValidationError):
                        adapter.validate_python(end + step if not open_ else end)


# -- optimisers -----------------------------------------------------------------------------------------


def _scores(points: list[list[float]]) -> list[float]:
    return [sum((u - 0.3) ** 2 for u in p) for p in points]


def _run(optimizer: object, generations: int) -> list[list[list[float]]]:
    asked = []
    for _ in range(generations):
        points = optimizer.ask()  # type: ignore[attr-defined]
        asked.append(points)
        optimizer.tell(points, _scores(points))  # type: ignore[attr-defined]
        np.random.rand(3)  # someone else drawing from numpy's global generator changes nothing
    return asked


@pytest.mark.parametrize("name", ["cma", "random", "grid"])
def test_optimisers_start_at_the_default_and_are_deterministic_for_a_seed(name: str) -> None:
    spec = ties(name, evaluations=30)
    first, second = _run(make_optimizer(spec), 3), _run(make_optimizer(spec), 3)
    assert first == second
    assert first[0][0] == spec.space.default_point()
    assert all(0 <= u <= 1 for generation in first for p in generation for u in p)
    if name != "grid":
        other = spec_of(TIES.replace("OPTIMIZER", name).replace("EVALUATIONS", "30").replace(
            "tune:\n", "tune:\n  seed: 1\n"))
        assert _run(make_optimizer(other), 2)[1] != first[1]


@pytest.mark.parametrize("name", ["cma", "random", "grid"])
def test_a_restored_optimiser_asks_exactly_what_an_uninterrupted_one_asks(name: str) -> None:
    spec = ties(name, evaluations=60)
    straight = make_optimizer(spec)
    expected = _run(straight, 4)
    interrupted = make_optimizer(spec)
    _run(interrupted, 2)
    state = pickle.loads(pickle.dumps(interrupted.state_dict()))
    restored = make_optimizer(spec)
    restored.load_state_dict(state)
    assert _run(restored, 2) == expected[2:]


def test_cma_improves_on_a_simple_bowl_and_stops_at_the_budget() -> None:
    search = CmaSearch([0.9, 0.9], population=6, sigma=0.3, seed=3, evaluations=100)
    best, told = math.inf, 0
    while not search.done():
        points = search.ask()
        scores = _scores(points)
        best, told = min(best, *scores), told + len(points)
        search.tell(points, scores)
    assert told == 100 and best < 1e-3 < _scores([[0.9, 0.9]])[0]


def test_random_search_is_uniform_and_respects_the_budget() -> None:
    search = RandomSearch([0.5] * 3, population=7, seed=0, evaluations=400)
    points = [p for generation in _run(search, 60) for p in generation]
    assert len(points) == 400 and search.done()
    assert np.mean(points) == pytest.approx(0.5, abs=0.03)


def test_the_grid_is_sized_to_the_budget_and_refuses_one_it_cannot_fit() -> None:
    dims = [Dimension("a"), Dimension("b")]
    assert grid_sizes(dims, 20) == [4, 4] and grid_sizes(dims, 4) == [2, 2]
    method = Dimension("m", choices=("linear", "ties", "dare_ties"))
    assert grid_sizes([method, *dims], 27) == [3, 3, 3]
    with pytest.raises(ValueError, match="needs at least 12 evaluations"):
        grid_sizes([method, *dims], 11)
    search = GridSearch(dims, [0.5, 0.5], population=5, evaluations=20)
    points = [p for generation in _run(search, 10) for p in generation]
    assert search.done() and points[0] == [0.5, 0.5] and len(points) == 17  # default + 4 x 4
    assert sorted({p[0] for p in points}) == [0.0, 1 / 3, 0.5, 2 / 3, 1.0]


def test_a_space_of_one_dimension_maps_recipes_one_to_one() -> None:
    space = SearchSpace((Dimension("parameters.lambda", 0.5, 2.0),),
                        {"merge_method": "task_arithmetic", "parameters": {"lambda": {"search": [0.5, 2]}}})
    assert space.recipe_for([1 / 3])["parameters"] == {"lambda": 1.0}
    assert space.values([1.0]) == {"parameters.lambda": 2.0}


# -- data files, the CLI, and no torch ------------------------------------------------------------------


def test_data_files_are_checked_when_the_search_starts(tmp_path: Path) -> None:
    good, empty, jsonl = tmp_path / "good.txt", tmp_path / "empty.txt", tmp_path / "empty.jsonl"
    good.write_text("def f(): pass\n", encoding="utf-8")
    empty.write_text("", encoding="utf-8")
    jsonl.write_text("\n", encoding="utf-8")
    space = ONE % "{search: [0.1, 1]}"
    check_data_files(spec_of(_merge(space, tune=f"{{data: {good}, budget: {{evaluations: 3}}}}")).settings)
    for bad, fragment in ((empty, "is empty"), (jsonl, "empty"), (tmp_path / "no.txt", "does not exist")):
        text = _merge(space, tune=f"{{data: {good}, test: {bad}, budget: {{evaluations: 3}}}}")
        with pytest.raises(FusekitError) as info:
            check_data_files(spec_of(text).settings)
        assert str(info.value).startswith("tune.test: ") and str(bad) in str(info.value)
        assert fragment in str(info.value) and "\n" not in str(info.value)


def test_validate_accepts_a_tune_recipe_and_merge_refuses_it(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    run = in_process_cli(capsys)
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    code, out, _ = run("validate", str(recipe))
    assert code == 0 and "a valid tune recipe (merge, 6 dimensions, optimizer cma)" in out
    out_dir = tmp_path / "out"
    code, _, err = run("merge", str(recipe), str(out_dir))
    assert code == 2 and f"run: fusekit tune {recipe} OUT_DIR first" in err and not out_dir.exists()
    recipe.write_text(RECIPE.split("tune:")[0], encoding="utf-8")  # search spaces, no tune block
    code, _, err = run("merge", str(recipe), str(out_dir))
    assert code == 2 and "merge_method: a search space ({search: ...}) is read only by fusekit tune" in err
    assert len(err.strip().splitlines()) == 1 and not out_dir.exists()
    recipe.write_text(RECIPE.replace("[0, 1], groups", "[1, 0], groups"), encoding="utf-8")
    code, _, err = run("validate", str(recipe))
    assert code == 2 and f"{recipe}:9:16 models[1].parameters.weight.search: the bounds are reversed" in err


def test_validating_loading_and_asking_import_no_torch(tmp_path: Path) -> None:
    """(That such a check sees torch when it is loaded: test_structure.py's
    test_push_and_recipe_checks_start_without_torch.)"""
    recipe = tmp_path / "tune.yaml"
    recipe.write_text(RECIPE, encoding="utf-8")
    code = ("import sys\nfrom fusekit.cli import main\n"
            f"try:\n    main(['validate', {str(recipe)!r}])\n"
            "except SystemExit as exc:\n    assert not exc.code\n"
            "from fusekit.tune.spec import load_tune_spec\n"
            "from fusekit.tune.optimizers import make_optimizer\n"
            f"spec = load_tune_spec({str(recipe)!r})\nmake_optimizer(spec).ask()\n"
            "heavy = {'torch', 'transformers', 'peft', 'ray'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
