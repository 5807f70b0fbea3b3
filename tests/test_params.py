"""Parameter resolution: gradients, substring filters and the precedence of parameter tables.

Expected values are worked out by hand in the tests (s = t·(n−1), i0 = floor(s),
i1 = min(n−1, i0+1), value = (1−f)·p[i0] + f·p[i1] with f = s − i0).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import write_recipe
from hypothesis import given
from hypothesis import strategies as st

import fusekit
from fusekit.plan import Plan
from fusekit.recipe.params import ParameterScope, evaluate, filter_matches, interpolate_gradient
from fusekit.recipe.schema import Filtered

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ = "model.layers.0.mlp.up_proj.weight"


# -- interpolate_gradient -----------------------------------------------------------------------


@pytest.mark.parametrize(("t", "expected"), [(0.0, 0.0), (0.25, 0.5), (0.5, 1.0), (0.75, 0.75),
                                             (1.0, 0.5)])
def test_gradient_three_points(t: float, expected: float) -> None:
    # [0, 1, 0.5]: s = 2t; t=.25 → halfway 0..1; t=.75 → halfway 1..0.5.
    assert interpolate_gradient([0.0, 1.0, 0.5], t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_gradient_single_point_is_constant(t: float) -> None:
    assert interpolate_gradient([0.7], t) == 0.7


@pytest.mark.parametrize(("t", "expected"), [(0.0, 2.0), (0.3, 2.6), (0.5, 3.0), (1.0, 4.0)])
def test_gradient_two_points_is_a_straight_line(t: float, expected: float) -> None:
    assert interpolate_gradient([2.0, 4.0], t) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize(("t", "expected"), [
    (0.0, 0.0),     # s=0     → p[0]
    (0.125, 5.0),   # s=0.5   → halfway 0..10
    (0.25, 10.0),   # s=1     → p[1] exactly
    (0.6, 16.0),    # s=2.4   → 0.6·20 + 0.4·10
    (0.9, 4.0),     # s=3.6   → 0.4·10 + 0.6·0
    (1.0, 0.0),     # s=4     → p[4]; i1 clamps to the last point
])
def test_gradient_five_points(t: float, expected: float) -> None:
    assert interpolate_gradient([0.0, 10.0, 20.0, 10.0, 0.0], t) == pytest.approx(expected, abs=1e-9)


def _reference(points: list[float], t: float) -> float:
    """The documented formula, written independently of the code under test."""
    n = len(points)
    if n == 1:
        return points[0]
    s = t * (n - 1)
    i0 = math.floor(s)
    i1 = min(n - 1, i0 + 1)
    i0 = min(i0, n - 1)
    f = s - i0
    return (1 - f) * points[i0] + f * points[i1]


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False)
unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


@given(value=finite, n=st.integers(min_value=1, max_value=12), t=unit)
def test_gradient_of_identical_values_is_that_value(value: float, n: int, t: float) -> None:
    assert interpolate_gradient([value] * n, t) == pytest.approx(value, rel=1e-12, abs=1e-9)


@given(points=st.lists(finite, min_size=1, max_size=12), t=unit)
def test_gradient_stays_within_its_points(points: list[float], t: float) -> None:
    result = interpolate_gradient(points, t)
    slack = 1e-9 * max(1.0, max(abs(p) for p in points))
    assert min(points) - slack <= result <= max(points) + slack
    assert result == pytest.approx(_reference(points, t), rel=1e-9, abs=1e-6)


@given(points=st.lists(finite, min_size=2, max_size=12))
def test_gradient_hits_every_point_at_its_own_depth(points: list[float]) -> None:
    n = len(points)
    for i, point in enumerate(points):
        assert interpolate_gradient(points, i / (n - 1)) == pytest.approx(point, rel=1e-9, abs=1e-6)


# -- filters ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern", [None, "*"])
def test_absent_or_star_filter_matches_everything(pattern: str | None) -> None:
    for name in (Q_PROJ, UP_PROJ, "lm_head.weight", "model.embed_tokens.weight"):
        assert filter_matches(pattern, name)


def test_filter_is_a_plain_substring() -> None:
    assert filter_matches("self_attn", Q_PROJ)
    assert not filter_matches("self_attn", UP_PROJ)
    assert filter_matches("mlp", UP_PROJ)
    assert filter_matches("layers.0.", UP_PROJ)
    assert not filter_matches("layers.1.", UP_PROJ)


@pytest.mark.parametrize("glob", ["*.mlp", "*mlp*", "model.layers.*.mlp", "mlp.*", "?lp"])
def test_filter_is_not_a_glob(glob: str) -> None:
    assert not filter_matches(glob, UP_PROJ)


def test_filtered_entries_first_match_wins() -> None:
    value = (Filtered("self_attn", 0.1), Filtered("q_proj", 0.2), Filtered(None, 0.9))
    assert evaluate(value, Q_PROJ, 0.0) == 0.1  # both first entries match; the first wins
    assert evaluate(value, UP_PROJ, 0.0) == 0.9
    assert evaluate(value, "lm_head.weight", 0.0) == 0.9


def test_filtered_entries_without_a_match_give_none() -> None:
    value = (Filtered("self_attn", 0.1), Filtered("*.mlp", 0.2))
    assert evaluate(value, UP_PROJ, 0.5) is None


def test_filtered_entry_holding_a_gradient_is_interpolated() -> None:
    value = (Filtered("mlp", (0.0, 1.0)), Filtered("*", (4.0, 2.0)))
    assert evaluate(value, UP_PROJ, 0.25) == pytest.approx(0.25)
    assert evaluate(value, Q_PROJ, 0.25) == pytest.approx(3.5)  # 0.75·4 + 0.25·2


def test_scalars_pass_through_evaluate() -> None:
    assert evaluate(0.3, Q_PROJ, 0.7) == 0.3
    assert evaluate(False, Q_PROJ, 0.7) is False
    assert evaluate("x", Q_PROJ, 0.7) == "x"
    assert evaluate((1.0, 3.0), Q_PROJ, 0.5) == pytest.approx(2.0)


# -- ParameterScope precedence ------------------------------------------------------------------


def _scope() -> ParameterScope:
    source = {"weight": 1.0}
    entry = {"weight": 2.0, "density": 0.2}
    out_slice = {"weight": 3.0, "density": 0.3, "lambda": 0.5}
    top = {"weight": 4.0, "density": 0.4, "lambda": 0.6, "normalize": False}
    return ParameterScope(per_model={"A": [source, entry]}, shared=[out_slice, top])


def test_lookup_precedence_source_entry_slice_top() -> None:
    scope = _scope()
    assert scope.lookup("weight", Q_PROJ, 0.0, "A") == 1.0  # slice source
    assert scope.lookup("density", Q_PROJ, 0.0, "A") == 0.2  # model entry
    assert scope.lookup("lambda", Q_PROJ, 0.0, "A") == 0.5  # output slice
    assert scope.lookup("normalize", Q_PROJ, 0.0, "A") is False  # top level; False is a value
    assert scope.lookup("epsilon", Q_PROJ, 0.0, "A") is None


def test_lookup_for_the_method_skips_per_model_tables() -> None:
    scope = _scope()
    assert scope.lookup("weight", Q_PROJ, 0.0) == 3.0
    assert scope.lookup("density", Q_PROJ, 0.0) == 0.3


def test_lookup_for_another_model_does_not_see_a_models_tables() -> None:
    scope = _scope()
    assert scope.lookup("weight", Q_PROJ, 0.0, "B") == 3.0


def test_falsy_value_in_a_specific_table_wins() -> None:
    scope = ParameterScope(per_model={"A": [{"weight": 0.0}]}, shared=[{"weight": 5.0}])
    assert scope.lookup("weight", Q_PROJ, 0.0, "A") == 0.0


def test_unmatched_filter_falls_through_to_the_next_table() -> None:
    source = {"weight": (Filtered("self_attn", 1.0),)}
    entry = {"weight": (Filtered("mlp", 2.0),)}
    top = {"weight": (Filtered("lm_head", 9.0),)}
    scope = ParameterScope(per_model={"A": [source, entry]}, shared=[top])
    assert scope.lookup("weight", Q_PROJ, 0.0, "A") == 1.0
    assert scope.lookup("weight", UP_PROJ, 0.0, "A") == 2.0
    assert scope.lookup("weight", "lm_head.weight", 0.0, "A") == 9.0
    assert scope.lookup("weight", "model.norm.weight", 0.0, "A") is None


def test_lookup_interpolates_a_gradient_at_t() -> None:
    scope = ParameterScope(shared=[{"weight": (0.0, 1.0, 0.5)}])
    assert scope.lookup("weight", Q_PROJ, 0.75) == pytest.approx(0.75)


def test_empty_scope_gives_none() -> None:
    assert ParameterScope().lookup("weight", Q_PROJ, 0.5, "A") is None


# -- through the planner: what each planned tensor actually gets ----------------------------------


def _weights(plan: Plan, output: str) -> dict[str, float]:
    task = next(t for t in plan.tasks if t.output == output)
    return {i.model: p.weight for i, p in zip(task.inputs, task.model_params, strict=True)}


def test_plan_resolves_gradients_filters_and_precedence(tmp_path: Path,
                                                        tiny_models: dict[str, Path]) -> None:
    base, math_, code = (str(tiny_models[k]) for k in ("base", "math", "code"))
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
merge_method: linear
parameters:
  weight: 7
models:
  - model: {base}
    parameters:
      weight: [0, 1]
  - model: {math_}
    parameters:
      weight:
        - filter: self_attn
          value: 0.25
        - filter: "*.mlp"
          value: 100
  - model: {code}
""")
    plan = fusekit.plan_merge(recipe)
    # Two layers: layer 0 is at t=0, layer 1 at t=1; embeddings and the head at t=0.
    assert _weights(plan, "model.layers.0.self_attn.q_proj.weight") == {base: 0.0, math_: 0.25,
                                                                         code: 7.0}
    assert _weights(plan, "model.layers.1.self_attn.q_proj.weight") == {base: 1.0, math_: 0.25,
                                                                         code: 7.0}
    # "*.mlp" is not a glob: no math entry matches, so math falls through to the top level.
    assert _weights(plan, "model.layers.1.mlp.up_proj.weight") == {base: 1.0, math_: 7.0, code: 7.0}
    assert _weights(plan, "model.embed_tokens.weight") == {base: 0.0, math_: 7.0, code: 7.0}
    assert _weights(plan, "lm_head.weight") == {base: 0.0, math_: 7.0, code: 7.0}


def test_plan_gradient_across_a_four_layer_slice(tmp_path: Path,
                                                 tiny_models: dict[str, Path]) -> None:
    # Slices stack layers [0,2) then [0,2) again: each slice has its own t = i/(n-1) in {0, 1}.
    base, math_ = str(tiny_models["base"]), str(tiny_models["math"])
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
merge_method: linear
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
        parameters:
          weight: [1, 0, 3]
      - model: {math_}
        layer_range: [0, 2]
    parameters:
      weight: 2
  - sources:
      - model: {base}
        layer_range: [1, 2]
        parameters:
          weight: [5, 9]
      - model: {math_}
        layer_range: [0, 1]
        parameters:
          weight: 4
""")
    plan = fusekit.plan_merge(recipe)
    name = "model.layers.{}.mlp.down_proj.weight"
    assert _weights(plan, name.format(0)) == {base: 1.0, math_: 2.0}  # t=0
    assert _weights(plan, name.format(1)) == {base: 3.0, math_: 2.0}  # t=1
    assert _weights(plan, name.format(2)) == {base: 9.0, math_: 4.0}  # one-layer slice: t=1
    task = next(t for t in plan.tasks if t.output == name.format(2))
    assert [i.name for i in task.inputs] == [name.format(1), name.format(0)]


def test_per_model_filters_see_the_source_layer_method_filters_the_output(
        tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    base, math_ = str(tiny_models["base"]), str(tiny_models["math"])
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
merge_method: linear
parameters:
  normalize:
    - filter: layers.1.
      value: false
    - value: true
slices:
  - sources:
      - model: {base}
        layer_range: [1, 2]
        parameters:
          weight:
            - filter: layers.1.
              value: 2
            - value: 1
      - model: {math_}
        layer_range: [0, 1]
        parameters:
          weight:
            - filter: layers.1.
              value: 2
            - value: 1
""")
    plan = fusekit.plan_merge(recipe)
    task = next(t for t in plan.tasks if t.output == "model.layers.0.self_attn.o_proj.weight")
    assert _weights(plan, task.output) == {base: 2.0, math_: 1.0}
    # The method-wide filter is matched against the output name (layer 0), so it falls to true.
    assert task.params.normalize is True


# -- ranges of numbers: karcher steps, seeds, temperatures -------------------------------------------


def _karcher(parameters: str) -> str:
    from fusekit.errors import RecipeError
    from fusekit.recipe import parse_merge_recipe

    with pytest.raises(RecipeError) as info:
        parse_merge_recipe("merge_method: karcher\nmodels: [{model: a}, {model: b}]\n"
                           f"parameters: {parameters}\n", "r.yaml")
    return str(info.value)


@pytest.mark.parametrize(("parameters", "key", "rule"), [
    ("{max_iter: 1e9, tol: 0}", "parameters.max_iter", "[0, 1000]"),
    ("{max_iter: 1001}", "parameters.max_iter", "[0, 1000]"),
    ("{max_iter: -1}", "parameters.max_iter", "[0, 1000]"),
    ("{max_iter: 1" + "0" * 400 + "}", "parameters.max_iter", "finite number"),
    ("{max_iter: 2.5}", "parameters.max_iter", "integer"),
    ("{tol: -1.0e-3}", "parameters.tol", ">= 0"),
    ("{tol: .nan}", "parameters.tol", "finite"),
])
def test_karcher_steps_and_tolerance_are_bounded(parameters: str, key: str, rule: str) -> None:
    message = _karcher(parameters)
    assert message.startswith(f"r.yaml:3:14 {key}: ") and rule in message


def test_karcher_bounds_themselves_are_accepted() -> None:
    from fusekit.ops.spherical import KARCHER_MAX_ITER, KarcherParams
    from fusekit.recipe import parse_merge_recipe

    recipe, _ = parse_merge_recipe("merge_method: karcher\nmodels: [{model: a}, {model: b}]\n"
                                   "parameters: {max_iter: 1000, tol: 0}\n", "r.yaml")
    assert recipe.parameters == {"max_iter": 1000.0, "tol": 0.0}
    assert KarcherParams(max_iter=KARCHER_MAX_ITER, tol=0.0).max_iter == 1000
    with pytest.raises(ValueError, match="steps in"):
        KarcherParams(max_iter=KARCHER_MAX_ITER + 1)


def test_seed_range_is_exactly_what_torch_accepts() -> None:
    import torch

    from fusekit.recipe.numbers import SEED_MAX, SEED_MIN, check_seed

    for seed in (SEED_MIN, 0, SEED_MAX):
        assert check_seed(seed) == seed
        torch.Generator().manual_seed(seed)  # the independent reference: torch takes it
    for seed in (SEED_MIN - 1, SEED_MAX + 1, 10**400):
        with pytest.raises(ValueError, match=r"between -2\*\*63 and 2\*\*64 - 1"):
            check_seed(seed)
        with pytest.raises((RuntimeError, ValueError, OverflowError)):  # torch refuses it too
            torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1])
def test_temperature_must_be_finite_and_not_negative(value: float) -> None:
    from fusekit.errors import FusekitError
    from fusekit.recipe.numbers import check_option, check_temperature

    with pytest.raises(FusekitError, match=r"^--temperature: must be a finite number >= 0"):
        check_option("--temperature", check_temperature, value)
    assert check_option("--temperature", check_temperature, 0.0) == 0.0


def test_route_and_ensemble_recipe_seeds_are_checked() -> None:
    from fusekit.ensemble.recipe import parse_ensemble_recipe
    from fusekit.errors import RecipeError
    from fusekit.route.recipe import parse_route_recipe

    with pytest.raises(RecipeError, match="seed: must be an integer between"):
        parse_route_recipe(f"models: [{{model: ./a}}, {{model: ./b}}]\ndata: d.jsonl\nseed: {2**64}\n")
    with pytest.raises(RecipeError, match="generation.seed: must be an integer between"):
        parse_ensemble_recipe("models: [{model: ./a}]\ngeneration: {seed: " + "9" * 400 + "}\n")
    assert parse_route_recipe("models: [{model: ./a}, {model: ./b}]\ndata: d.jsonl\nseed: -5\n")[0].seed == -5
