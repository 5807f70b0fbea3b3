"""The task-vector family, checked against float64 references written from mergekit 0.1.5's rules.

The references never call fusekit. With base ``b``, models ``θ_i``, weights ``w_i`` and task vectors
``τ_i = θ_i − b``:

- sparsify each ``τ_i``:
  - magnitude (ties): keep the ``max(1, ⌊d·n⌋)`` largest ``|τ|`` of the tensor, equal magnitudes in
    index order; ``d ≥ 1`` keeps everything, ``d ≤ 0`` nothing.
  - magnitude_outliers (breadcrumbs): sort ``|τ|`` ascending (ties in index order), skip
    ``max(0, n − ⌊d·n⌋ − ⌊γ·n⌋)``, keep the next ``⌊d·n⌋``.
  - random (dare): keep each entry with probability ``d``.
  - della_magprune: along dim 1, keep with probability ``d − ε + 2ε (r − 1)/(n − 1)`` for the
    ascending magnitude rank ``r``.
  - rescale: kept entries times ``‖τ‖₁ / ‖kept‖₁`` (unless a norm is below 1e-7).
- sign election ("sum"): elected sign ``+`` where ``Σ w_i τ̃_i ≥ 0``, else ``−``; ``m_i`` = 1 where
  ``w_i τ̃_i`` has the elected sign (zeros never).
- ``merged = b + λ Σ m_i w_i τ̃_i``, divided by ``Σ m_i w_i`` (0 → 1) when normalize; without
  election by ``Σ w_i`` (``|·| < 1e-8`` → 1).
- sce: keep the ``⌊nnz(var)·k⌋`` entries of largest variance across models (population variance,
  product in float32), elect on the plain ``τ̃``, ``e_i = mean(τ̃_i²)/Σ_j mean(τ̃_j²)`` (``1/n``
  when that sum is below 1e-6), ``merged = b + Σ m_i e_i τ̃_i / max(Σ m_i e_i, 1e-6)``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import load_weights, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fusekit
from fusekit.errors import RecipeError
from fusekit.ops import MergeInputs, get_method
from fusekit.ops import sparsify as sp
from fusekit.ops.task_vectors import sign_agreement
from fusekit.recipe import parse_merge_recipe

EPS32 = torch.finfo(torch.float32).eps
DETERMINISTIC = ("task_arithmetic", "ties", "breadcrumbs", "breadcrumbs_ties", "sce")
STOCHASTIC = ("dare_linear", "dare_ties", "della", "della_linear")
ALL = DETERMINISTIC + STOCHASTIC
SHAPES = [(7, 5), (11,), (2, 3, 4), (40, 30)]


# -- helpers ------------------------------------------------------------------------------------------


def run(name: str, base: torch.Tensor, tensors: list[torch.Tensor], model_params: list[dict] | None = None,
        params: dict | None = None, *, seed: int = 0, tensor_name: str = "w") -> torch.Tensor:
    method = get_method(name)
    model_params = model_params if model_params is not None else [{} for _ in tensors]
    return method.kernel(MergeInputs(
        tensors=tensors, model_params=[method.model_params.model_validate(p) for p in model_params],
        params=method.method_params.model_validate(params or {}), base=base, seed=seed,
        tensor_name=tensor_name))


def sample(seed: int, count: int, shape: tuple[int, ...] = (7, 5)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` fine-tunes whose task vectors have sign conflicts, exact zeros (the model
    keeps the base's value) and a large outlier."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    models = []
    for i in range(count):
        delta = 0.1 * torch.randn(shape, generator=gen)
        flat = delta.view(-1)
        flat[i % flat.numel()] = 0.0
        flat[(3 * i + 1) % flat.numel()] = 40.0 * (-1) ** i
        models.append(base + delta)
    if count > 1:  # the same entry pulled both ways
        models[0].view(-1)[-1] = base.view(-1)[-1] + 0.5
        models[1].view(-1)[-1] = base.view(-1)[-1] - 0.7
    return base, models


def ref_top(magnitudes: list[float], count: int, *, largest: bool) -> set[int]:
    """Indices of the first ``count`` entries of a stable sort of ``magnitudes``."""
    order = sorted(range(len(magnitudes)), key=lambda i: (-magnitudes[i] if largest else magnitudes[i], i))
    return set(order[:max(count, 0)])


def ref_sparsify(tau: torch.Tensor, sparsifier: str | None, density: float, gamma: float,
                 rescale: bool) -> torch.Tensor:
    """Deterministic sparsifiers in float64."""
    if sparsifier is None or density >= 1:
        return tau
    flat = tau.reshape(-1)
    n = flat.numel()
    magnitudes = flat.abs().tolist()
    if sparsifier == "magnitude":
        keep = set() if density <= 0 else ref_top(magnitudes, max(1, int(density * n)), largest=True)
    else:
        kept = int(density * n)
        skipped = max(0, n - kept - int(gamma * n))
        keep = (ref_top(magnitudes, skipped + kept, largest=False)
                - ref_top(magnitudes, skipped, largest=False))
    mask = torch.zeros(n, dtype=torch.float64)
    mask[sorted(keep)] = 1.0
    masked = (flat * mask).reshape(tau.shape)
    return ref_rescale(tau, masked) if rescale else masked


def ref_rescale(tau: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    before, after = float(tau.abs().sum()), float(masked.abs().sum())
    return masked if before < 1e-7 or after < 1e-7 else masked * (before / after)


def ref_elect(weighted: list[torch.Tensor]) -> list[torch.Tensor]:
    """m_i: 1 where w_i τ_i is non-zero with the sign of Σ w_j τ_j (0 counts as +)."""
    elected = torch.where(sum(weighted) >= 0, 1.0, -1.0).double()
    return [(torch.sign(x) == elected).double() for x in weighted]


def ref_merge(base: torch.Tensor, tensors: list[torch.Tensor], model_params: list[dict], *,
              sparsifier: str | None = None, consensus: bool = False, normalize: bool = False,
              rescale: bool = False, lambda_: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(float64 result, elementwise float32 rounding bound) of the weighted methods."""
    b = base.double()
    taus = [ref_sparsify(t.double() - b, sparsifier, p.get("density", 1.0), p.get("gamma", 0.01), rescale)
            for t, p in zip(tensors, model_params, strict=True)]
    weights = [float(p["weight"]) for p in model_params]
    weighted = [w * tau for w, tau in zip(weights, taus, strict=True)]
    masks = ref_elect(weighted) if consensus else [torch.ones_like(b) for _ in taus]
    mixed = sum(m * x for m, x in zip(masks, weighted, strict=True))
    magnitude = sum(m * x.abs() for m, x in zip(masks, weighted, strict=True))
    if consensus:
        divisor = sum(m * w for m, w in zip(masks, weights, strict=True))
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        total = math.fsum(weights)
        divisor = torch.full_like(b, total if abs(total) >= 1e-8 else 1.0)
    if normalize:
        mixed, magnitude = mixed / divisor, magnitude / divisor.abs()
    bound = 24 * EPS32 * (b.abs() + abs(lambda_) * magnitude) + 1e-30
    return b + lambda_ * mixed, bound


def ref_sce(base: torch.Tensor, tensors: list[torch.Tensor],
            select_topk: float) -> tuple[torch.Tensor, torch.Tensor]:
    b = base.double()
    taus = torch.stack([t.double() - b for t in tensors])  # (n, *shape)
    if select_topk < 1:
        variance = taus.var(dim=0, unbiased=False).reshape(-1)
        nonzero = int((variance != 0).sum())
        product = (torch.tensor(float(nonzero), dtype=torch.float32)
                   * torch.tensor(select_topk, dtype=torch.float32))  # float32, as mergekit
        count = int(product)
        keep = ref_top(variance.tolist(), count, largest=True) if select_topk > 0 else set()
        mask = torch.zeros(variance.numel(), dtype=torch.float64)
        mask[sorted(keep)] = 1.0
        taus = taus * mask.view(base.shape)
    masks = ref_elect(list(taus))
    energy = [float(tau.square().mean()) for tau in taus]
    total = math.fsum(energy)
    weights = [1 / len(energy)] * len(energy) if abs(total) < 1e-6 else [e / total for e in energy]
    kept = [w * m for w, m in zip(weights, masks, strict=True)]
    divisor = torch.clamp(sum(kept), min=1e-6)
    mixed = sum(k * tau for k, tau in zip(kept, taus, strict=True)) / divisor
    magnitude = sum(k * tau.abs() for k, tau in zip(kept, taus, strict=True)) / divisor
    return b + mixed, 24 * EPS32 * (b.abs() + magnitude) + 1e-30


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    error = (actual.double() - expected).abs()
    worst = float((error - bound).max()) if error.numel() else 0.0
    assert torch.all(error <= bound), f"max excess over the bound {worst:.3e}"


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().view(-1).view(torch.uint8).equal(
        b.contiguous().view(-1).view(torch.uint8))


# -- registration and parameters ----------------------------------------------------------------------


@pytest.mark.parametrize(("name", "model_defaults", "method_defaults", "stochastic"), [
    ("task_arithmetic", {"density": 1.0}, {"normalize": False, "rescale": False}, False),
    ("ties", {"density": 1.0}, {"normalize": True, "rescale": False}, False),
    ("dare_linear", {"density": 1.0}, {"normalize": False, "rescale": True}, True),
    ("dare_ties", {"density": 1.0}, {"normalize": False, "rescale": True}, True),
    ("breadcrumbs", {"density": 1.0, "gamma": 0.01}, {"normalize": False, "rescale": False}, False),
    ("breadcrumbs_ties", {"density": 1.0, "gamma": 0.01}, {"normalize": False, "rescale": False}, False),
    ("della", {"density": 1.0, "epsilon": 0.15}, {"normalize": True, "rescale": True}, True),
    ("della_linear", {"density": 1.0, "epsilon": 0.15}, {"normalize": False, "rescale": True}, True),
])
def test_weighted_methods_take_mergekits_parameters_and_defaults(
        name: str, model_defaults: dict, method_defaults: dict, stochastic: bool) -> None:
    method = get_method(name)
    assert method.base == "required"
    assert method.stochastic is stochastic
    assert method.parameter_names() == {"weight": "model", **{k: "model" for k in model_defaults},
                                        "normalize": "method", "rescale": "method", "lambda": "method",
                                        "int8_mask": "method"}
    model = method.model_params.model_validate({"weight": 0.5})
    assert {k: getattr(model, k) for k in model_defaults} == model_defaults
    params = method.method_params.model_validate({})
    assert {k: getattr(params, k) for k in method_defaults} == method_defaults
    assert (params.lambda_, params.int8_mask) == (1.0, False)
    assert method.method_params.model_validate({"lambda": 0.3}).lambda_ == 0.3


def test_sce_takes_only_select_topk_and_int8_mask() -> None:
    method = get_method("sce")
    assert method.base == "required" and not method.stochastic
    assert method.parameter_names() == {"select_topk": "method", "int8_mask": "method"}
    params = method.method_params.model_validate({})
    assert (params.select_topk, params.int8_mask) == (1.0, False)


def test_only_task_arithmetic_may_be_split_into_row_blocks() -> None:
    assert [name for name in ALL if get_method(name).elementwise] == ["task_arithmetic"]


def load_error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse_merge_recipe(text, "r.yaml", strict=True)  # strict: settings with no effect are errors
    assert info.value.exit_code == 2
    return info.value


def recipe(method: str, models: list[str | Path], base: str | Path, model_parameters: str = "",
           parameters: str = "") -> str:
    listed = "".join(f"  - model: {m}\n{model_parameters}" for m in models)
    text = f"merge_method: {method}\nbase_model: {base}\nmodels:\n  - model: {base}\n{listed}"
    return text + (f"parameters:\n{parameters}" if parameters else "")


@pytest.mark.parametrize(("method", "model_parameters", "parameters", "fragments"), [
    ("ties", "    parameters: {weight: 1, density: 1.4}\n", "", ["density: must be in [0, 1], got 1.4"]),
    ("dare_ties", "    parameters: {weight: 1, density: [0.2, -0.5]}\n", "",
     ["density[1]: must be in [0, 1], got -0.5"]),
    ("breadcrumbs", "    parameters: {weight: 1, gamma: 2}\n", "", ["gamma: must be in [0, 1], got 2"]),
    ("della", "    parameters: {weight: 1, epsilon: -0.1}\n", "", ["epsilon: must be at least 0, got -0.1"]),
    ("sce", "", "  select_topk: 1.5\n", ["select_topk: must be in [0, 1], got 1.5"]),
    ("ties", "    parameters: {weight: 1, gamma: 0.1}\n", "", ["ties does not take 'gamma'"]),
    ("sce", "", "  normalize: true\n", ["sce does not take 'normalize'"]),
    ("dare_linear", "    parameters: {weight: 1}\n", "  rescale: maybe\n", ["rescale"]),
])
def test_bad_parameters_fail_when_the_recipe_loads(method: str, model_parameters: str, parameters: str,
                                                   fragments: list[str]) -> None:
    message = str(load_error(recipe(method, ["org/a"], "org/base", model_parameters, parameters)))
    for fragment in fragments:
        assert fragment in message


@pytest.mark.parametrize("method", ALL)
def test_methods_need_a_base_and_another_model(method: str) -> None:
    text = f"merge_method: {method}\nmodels:\n  - model: org/a\n  - model: org/b\n"
    assert "needs a base model" in str(load_error(text))
    assert f"{method} needs at least 1 model" in str(
        load_error(f"merge_method: {method}\nbase_model: org/a\nmodels:\n  - model: org/a\n"))


@pytest.mark.parametrize(("density", "epsilon", "ok"), [
    (0.5, 0.15, True), (0.1, 0.15, False), (0.9, 0.1, False), (0.9, 0.05, True), (1.0, 0.5, True),
    (0.0, 0.5, True),
])
def test_della_needs_density_plus_minus_epsilon_inside_zero_one(density: float, epsilon: float,
                                                                ok: bool) -> None:
    params = get_method("della").model_params
    if ok:
        params.model_validate({"weight": 1, "density": density, "epsilon": epsilon})
    else:
        with pytest.raises(ValueError, match=r"density ± epsilon must lie inside \(0, 1\)"):
            params.model_validate({"weight": 1, "density": density, "epsilon": epsilon})


def test_della_default_epsilon_with_a_small_density_fails_before_merging(tiny_models: dict[str, Path],
                                                                          tmp_path: Path) -> None:
    text = recipe("della", [tiny_models["math"]], tiny_models["base"],
                  "    parameters: {weight: 1, density: 0.1}\n")
    path = write_recipe(tmp_path / "r.yaml", text)
    with pytest.raises(RecipeError, match="density ± epsilon") as info:
        fusekit.plan_merge(path)
    assert info.value.exit_code == 2


def test_a_missing_weight_fails_before_merging(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    path = write_recipe(tmp_path / "r.yaml", recipe("ties", [tiny_models["math"]], tiny_models["base"],
                                                    "    parameters: {density: 0.5}\n"))
    with pytest.raises(RecipeError, match="ties needs parameter 'weight'"):
        fusekit.plan_merge(path)


# -- selection ----------------------------------------------------------------------------------------


def test_magnitude_keeps_the_largest_entries_and_breaks_ties_by_index() -> None:
    tau = torch.tensor([1.0, -3.0, 2.0, -2.0, 2.0, 0.0])
    assert sp.magnitude(tau, 0.5).tolist() == [0.0, -3.0, 2.0, -2.0, 0.0, 0.0]
    assert sp.magnitude(tau, 0.01).tolist() == [0.0, -3.0, 0.0, 0.0, 0.0, 0.0]  # at least one
    assert sp.magnitude(tau, 0.0).tolist() == [0.0] * 6
    assert sp.magnitude(tau, 1.0) is tau


def test_breadcrumbs_drops_outliers_and_the_smallest() -> None:
    tau = torch.tensor([5.0, -1.0, 3.0, 0.5, -4.0, 2.0, 0.1, 9.0, -3.0, 1.0])
    # ⌊0.5·10⌋ = 5 kept and ⌊0.2·10⌋ = 2 outliers (9, 5) leave 3 to skip at the bottom: ascending
    # |τ| is 0.1, 0.5, 1 (index 1), 1 (index 9), ... so index 1 goes and index 9 stays
    kept = sp.magnitude_outliers(tau, 0.5, gamma=0.2)
    assert kept.tolist() == [0.0, 0.0, 3.0, 0.0, -4.0, 2.0, 0.0, 0.0, -3.0, 1.0]
    # density + gamma > 1: only one outlier goes, so that ⌊0.9·10⌋ = 9 stay
    assert torch.equal(sp.magnitude_outliers(tau, 0.9, gamma=0.2),
                       torch.tensor([5.0, -1.0, 3.0, 0.5, -4.0, 2.0, 0.1, 0.0, -3.0, 1.0]))
    assert sp.magnitude_outliers(tau, 0.0).tolist() == [0.0] * 10


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), numel=st.integers(1, 3000), levels=st.integers(1, 40),
       density=st.floats(0.0, 1.0), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16,
                                                          torch.float64]))
def test_fast_selection_equals_a_stable_sort(seed: int, numel: int, levels: int, density: float,
                                             dtype: torch.dtype) -> None:
    """Heavy ties (few distinct magnitudes, spread over exponents) and every dtype: the histogram
    selection keeps exactly the first entries of ``argsort(stable=True)``."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(levels, generator=gen) * 10.0 ** torch.randint(-3, 4, (levels,), generator=gen)
    tau = values[torch.randint(0, levels, (numel,), generator=gen)].to(dtype)
    count = max(1, int(density * numel))
    magnitude = tau.abs().to(torch.float32)
    expected = torch.zeros(numel, dtype=torch.bool)
    expected[torch.argsort(magnitude, descending=True, stable=True)[:count]] = True
    assert torch.equal(sp.first_in_order(sp.magnitude_keys(tau), count, largest=True), expected)
    expected = torch.zeros(numel, dtype=torch.bool)
    expected[torch.argsort(magnitude, stable=True)[:count]] = True
    assert torch.equal(sp.first_in_order(sp.magnitude_keys(tau), count, largest=False), expected)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rows=st.integers(1, 60), levels=st.integers(1, 12),
       density=st.floats(0.0, 1.0), gamma=st.floats(0.0, 0.3), rescale=st.booleans(),
       kind=st.sampled_from(["magnitude", "magnitude_outliers", "random", "della_magprune"]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), data=st.data())
def test_streamed_sparsifier_gives_whole_tensor_bytes_for_any_row_blocks(
        seed: int, rows: int, levels: int, density: float, gamma: float, rescale: bool, kind: str,
        dtype: torch.dtype, data: st.DataObject) -> None:
    """Heavy ties across block borders: the counts, the tie quotas carried from block to block,
    the float64 row norms and the redrawn uniforms give exactly the one-block result."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(levels, generator=gen)
    tau = values[torch.randint(0, levels, (rows, 7), generator=gen)].to(dtype)
    epsilon = min(density, 1 - density) / 2
    rule = sp.SparsifyRule(kind, density, gamma=gamma, epsilon=epsilon, rescale=rescale)  # type: ignore[arg-type]

    def stream() -> sp.SparsifierStream:
        return sp.SparsifierStream(rule, shape=(rows, 7), dtype=dtype,
                                   generator=lambda: torch.Generator().manual_seed(seed))

    expected = stream().whole(tau)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, rows - 1)), max_size=5)))
    blocks = [tau[a:b] for a, b in zip([0, *cuts], [*cuts, rows], strict=True) if b > a]
    streamed = stream()
    for stage in sp.STAGES:
        for block in blocks:
            streamed.observe(stage, block)
        streamed.end_pass(stage)
    assert torch.equal(torch.cat([streamed.apply(block) for block in blocks]), expected)


def test_magnitude_ranks_float64_as_float32_like_mergekit() -> None:
    tau = torch.tensor([1.0 + 1e-12, -1.0, 0.5], dtype=torch.float64)  # equal in float32
    assert sp.magnitude(tau, 0.34).tolist() == [1.0 + 1e-12, 0.0, 0.0]


# -- deterministic methods against the references -----------------------------------------------------


WEIGHTED_CASES = [
    [{"weight": 1.0, "density": 0.5}, {"weight": 0.8, "density": 0.3}, {"weight": 0.5, "density": 0.7}],
    [{"weight": 0.6, "density": 0.2, "gamma": 0.1}, {"weight": -0.4, "density": 0.9, "gamma": 0.0},
     {"weight": 0.3, "density": 1.0}],
    [{"weight": 2.0, "density": 0.05}, {"weight": 1e-3, "density": 0.6, "gamma": 0.3}],
    [{"weight": 0.7, "density": 0.0}],
]
ROWS = {  # name: (sparsifier, consensus)
    "task_arithmetic": (None, False), "ties": ("magnitude", True),
    "breadcrumbs": ("magnitude_outliers", False), "breadcrumbs_ties": ("magnitude_outliers", True),
}


@pytest.mark.parametrize("name", list(ROWS))
@pytest.mark.parametrize("case", range(len(WEIGHTED_CASES)))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("options", [{}, {"normalize": True, "rescale": True, "lambda": 0.7},
                                     {"normalize": False, "lambda": 1.5}])
def test_weighted_methods_match_reference(name: str, case: int, shape: tuple[int, ...],
                                          options: dict) -> None:
    model_params = [p if name.startswith("breadcrumbs") else {k: v for k, v in p.items() if k != "gamma"}
                    for p in WEIGHTED_CASES[case]]
    base, tensors = sample(case, len(model_params), shape)
    sparsifier, consensus = ROWS[name]
    normalize = options.get("normalize", name == "ties")
    result = run(name, base, tensors, model_params, options)
    expected, bound = ref_merge(base, tensors, model_params, sparsifier=sparsifier, consensus=consensus,
                                normalize=normalize, rescale=options.get("rescale", False),
                                lambda_=options.get("lambda", 1.0))
    assert result.dtype == torch.float32 and result.shape == base.shape
    assert_within(result, expected, bound)


@pytest.mark.parametrize("count", [1, 2, 3])
@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("shape", SHAPES)
def test_sce_matches_reference(count: int, select_topk: float, shape: tuple[int, ...]) -> None:
    base, tensors = sample(count, count, shape)
    result = run("sce", base, tensors, params={"select_topk": select_topk})
    expected, bound = ref_sce(base, tensors, select_topk)
    assert result.dtype == torch.float32
    assert_within(result, expected, bound)


def test_sce_with_no_energy_weights_models_equally_and_keeps_the_base() -> None:
    base, tensors = sample(3, 2)
    tiny = [base + 1e-6 * (t - base) for t in tensors]  # mean square far below 1e-6
    expected, bound = ref_sce(base, tiny, 1.0)
    assert_within(run("sce", base, tiny), expected, bound)


def test_ties_elects_the_sign_of_the_weighted_sum() -> None:
    base = torch.zeros(4)
    a, b = torch.tensor([1.0, 2.0, -1.0, 2.0]), torch.tensor([-3.0, 1.0, 0.0, -4.0])
    params = [{"weight": 1.0}, {"weight": 0.5}]
    # entry 0: 1 − 1.5 < 0 → only b's −1.5 counts, ÷ 0.5; entry 2: b is 0 and never agrees;
    # entry 3: 2 − 2 = 0 elects + → only a counts
    assert run("ties", base, [a, b], params).tolist() == pytest.approx([-3.0, 5.0 / 3.0, -1.0, 2.0], rel=1e-6)
    assert run("ties", base, [a, b], params, {"normalize": False}).tolist() == [-1.5, 2.5, -1.0, 2.0]


def test_sign_election_by_summed_mass_or_by_count() -> None:
    deltas = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [-1.0, 0.0]])  # (n_models, 2)
    assert sign_agreement(deltas, "sum").tolist() == [[True, False], [False, False], [False, False]]
    assert sign_agreement(deltas, "count").tolist() == [[False, False], [True, False], [True, False]]


def test_sce_divides_by_at_least_1e_6() -> None:
    """Entry 1: only the low-energy model (e ≈ 1e-10) has the elected sign, so the divisor is
    clamped to 1e-6 and the entry shrinks from 0.01 to about e · 0.01 / 1e-6."""
    base = torch.zeros(2)
    strong, weak = torch.tensor([1000.0, -0.001]), torch.tensor([0.0, 0.01])
    result = run("sce", base, [strong, weak])
    expected, bound = ref_sce(base, [strong, weak], 1.0)
    assert_within(result, expected, bound)
    assert 0 < float(result[1]) < 2e-6


def test_rescale_matches_the_l1_norm_not_one_over_density() -> None:
    base, (model,) = sample(4, 1, (40, 30))
    tau = (model - base).double()
    for name in ("ties", "breadcrumbs", "dare_linear", "della_linear"):
        params = {"weight": 1.0, "density": 0.3}
        merged = run(name, base, [model], [params], {"rescale": True, "normalize": False})
        kept = (merged.double() - base.double())
        assert float(kept.abs().sum()) == pytest.approx(float(tau.abs().sum()), rel=1e-5)
        assert 0.2 < float((kept != 0).double().mean()) < 0.4


@pytest.mark.parametrize("name", ["ties", "breadcrumbs_ties", "task_arithmetic"])
def test_half_precision_arithmetic_stays_in_the_input_dtype(name: str) -> None:
    """mergekit computes in the working dtype and rounds the weights to it: 0.3 → 0.30078125 in bf16,
    so 3 · 0.3 gives 0.90234375, not round_bf16(0.9) = 0.8984375."""
    base = torch.zeros(4, dtype=torch.bfloat16)
    model = torch.tensor([3.0, 3.0, -3.0, 0.0], dtype=torch.bfloat16)
    result = run(name, base, [model], [{"weight": 0.3}], {"normalize": False})
    assert result.dtype == torch.bfloat16
    assert result.tolist() == [0.90234375, 0.90234375, -0.90234375, 0.0]
    # float16: 0.300048828125 · 3 rounds to 0.900390625; float32 then float16 would give 0.89990234375
    half = run(name, base.half(), [model.half()], [{"weight": 0.3}], {"normalize": False})
    assert half.dtype == torch.float16 and half.tolist() == [0.900390625, 0.900390625, -0.900390625, 0.0]


def test_int8_mask_changes_nothing() -> None:
    base, tensors = sample(5, 3, (40, 30))
    params = [{"weight": 0.5, "density": 0.4}] * 3
    for name in ("ties", "breadcrumbs_ties"):
        assert same_bytes(run(name, base, tensors, params, {"int8_mask": True}),
                          run(name, base, tensors, params))
    assert same_bytes(run("sce", base, tensors, params={"int8_mask": True, "select_topk": 0.3}),
                      run("sce", base, tensors, params={"select_topk": 0.3}))


def test_task_arithmetic_ignores_density_and_rescale_like_mergekit() -> None:
    base, tensors = sample(6, 2)
    plain = run("task_arithmetic", base, tensors, [{"weight": 0.4}, {"weight": 0.9}])
    dense = run("task_arithmetic", base, tensors, [{"weight": 0.4, "density": 0.1}, {"weight": 0.9}],
                {"rescale": True})
    assert same_bytes(plain, dense)


# -- invariants ---------------------------------------------------------------------------------------


def default_params(name: str, count: int, density: float = 0.5) -> list[dict]:
    if name == "sce":
        return [{} for _ in range(count)]
    return [{"weight": 1.0 / (i + 1), "density": density} for i in range(count)]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(name=st.sampled_from(ALL), seed=st.integers(0, 2**16), count=st.integers(1, 3),
       shape=st.sampled_from(SHAPES), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_models_equal_to_the_base_return_the_base(name: str, seed: int, count: int, shape: tuple[int, ...],
                                                  dtype: torch.dtype) -> None:
    base = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    params = {"select_topk": 0.5} if name == "sce" else {"rescale": True}
    copies = [base.clone() for _ in range(count)]
    result = run(name, base, copies, default_params(name, count), params, seed=seed)
    assert same_bytes(result, base)


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**16), shape=st.sampled_from(SHAPES), weight=st.floats(-2, 2),
       lambda_=st.floats(0.1, 2), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_one_model_at_density_one_is_task_arithmetic(seed: int, shape: tuple[int, ...], weight: float,
                                                      lambda_: float, dtype: torch.dtype) -> None:
    base, (model,) = sample(seed, 1, shape)
    base, model = base.to(dtype), model.to(dtype)
    params = [{"weight": weight, "density": 1.0}]
    expected = run("task_arithmetic", base, [model], params, {"lambda": lambda_})
    for name in ("ties", "dare_linear", "dare_ties", "breadcrumbs", "della_linear"):
        options = {"lambda": lambda_, "normalize": False}
        assert same_bytes(run(name, base, [model], params, options, seed=seed), expected), name


def test_dare_linear_at_density_one_is_task_arithmetic_for_several_models() -> None:
    base, tensors = sample(7, 3, (40, 30))
    params = [{"weight": w, "density": 1.0} for w in (0.3, -0.8, 1.1)]
    assert same_bytes(run("dare_linear", base, tensors, params, seed=3),
                      run("task_arithmetic", base, tensors, params))


def test_no_other_models_returns_the_base() -> None:
    base = torch.randn(4, 3)
    for name in ALL:
        assert run(name, base, [], []) is base


# -- stochastic methods -------------------------------------------------------------------------------


def kept_fraction(result: torch.Tensor, base: torch.Tensor) -> float:
    return float((result != base).double().mean())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.1, 0.3, 0.75])
def test_dare_keeps_about_density_of_the_entries(dtype: torch.dtype, density: float) -> None:
    gen = torch.Generator().manual_seed(8)
    base = torch.randn(200, 300, generator=gen).to(dtype)
    model = (base.float() + 1.0 + torch.rand(200, 300, generator=gen)).to(dtype)  # τ ≥ 1: never 0
    result = run("dare_linear", base, [model], [{"weight": 1.0, "density": density}], {"rescale": False})
    p = float(torch.tensor(density, dtype=dtype if dtype == torch.bfloat16 else torch.float32))
    sigma = math.sqrt(p * (1 - p) / base.numel())
    assert abs(kept_fraction(result, base) - p) < 5 * sigma
    kept = result != base
    assert torch.equal(result[kept], (base + (model - base))[kept])  # kept: base + τ, weight 1


def test_dare_with_rescale_preserves_the_expectation() -> None:
    """Averaged over seeds, ``b + rescale(mask · τ)`` tends to ``b + τ``: with magnitudes of one scale
    the L1 factor is close to 1/density (one huge outlier would skew it, as in mergekit)."""
    gen = torch.Generator().manual_seed(9)
    base = torch.randn(20, 30, generator=gen)
    tau = torch.randn(20, 30, generator=gen)
    density, seeds = 0.4, 300
    total = torch.zeros(20, 30, dtype=torch.float64)
    for seed in range(seeds):
        merged = run("dare_linear", base, [base + tau], [{"weight": 1.0, "density": density}], seed=seed)
        total += merged.double() - base.double()
    sigma = tau.double().abs() * math.sqrt((1 - density) / (density * seeds))
    assert torch.all((total / seeds - tau.double()).abs() <= 5 * sigma + 0.02 * tau.double().abs() + 1e-6)


@pytest.mark.parametrize(("density", "epsilon"), [(0.5, 0.15), (0.3, 0.25), (0.8, 0.1)])
def test_della_keep_rates_rise_with_the_magnitude_rank(density: float, epsilon: float) -> None:
    """Rows of 101 entries with distinct magnitudes; over 400 rows × seeds the keep rate of each rank
    decile matches the mean of ``d − ε + 2ε (r − 1)/100`` over it."""
    cols, rows = 101, 400
    gen = torch.Generator().manual_seed(10)
    ranks = torch.stack([torch.randperm(cols, generator=gen) for _ in range(rows)])  # 0-based
    signs = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -1.0, 1.0)
    tau = signs * (1.0 + ranks.float())
    base = torch.zeros(rows, cols)
    result = run("della_linear", base, [tau], [{"weight": 1.0, "density": density, "epsilon": epsilon}],
                 {"rescale": False}, seed=11)
    kept = (result != 0).double()
    probability = density - epsilon + 2 * epsilon * ranks.double() / (cols - 1)
    for low in range(0, cols, 10):
        band = (ranks >= low) & (ranks < low + 10)
        expected = float(probability[band].mean())
        sigma = math.sqrt(expected * (1 - expected) / int(band.sum()))
        assert abs(float(kept[band].mean()) - expected) < 5 * sigma, low
    assert abs(float(kept.mean()) - density) < 5 * math.sqrt(density * (1 - density) / kept.numel())


def test_della_ranks_one_dimensional_tensors_as_one_row() -> None:
    tau = torch.arange(1.0, 2001.0)
    result = run("della_linear", torch.zeros(2000), [tau], [{"weight": 1.0, "density": 0.5, "epsilon": 0.4}],
                 {"rescale": False}, seed=1)
    kept = result != 0
    assert float(kept[:200].double().mean()) < 0.25 < 0.75 < float(kept[-200:].double().mean())


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_methods_are_deterministic_given_seed_and_tensor_name(name: str) -> None:
    base, tensors = sample(12, 3, (40, 30))
    params = [{"weight": 0.5, "density": 0.5}] * 3
    first = run(name, base, tensors, params, seed=5, tensor_name="model.layers.0.mlp.up_proj.weight")
    again = run(name, base, tensors, params, seed=5, tensor_name="model.layers.0.mlp.up_proj.weight")
    other_name = run(name, base, tensors, params, seed=5, tensor_name="model.layers.1.mlp.up_proj.weight")
    other_seed = run(name, base, tensors, params, seed=6, tensor_name="model.layers.0.mlp.up_proj.weight")
    assert same_bytes(first, again)
    assert not torch.equal(first, other_name)
    assert not torch.equal(first, other_seed)


@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_results_do_not_depend_on_the_order_tensors_are_merged(name: str) -> None:
    params = [{"weight": 0.5, "density": 0.5}] * 2
    samples = {f"t{i}": sample(20 + i, 2, (30, 20)) for i in range(3)}
    forward = {key: run(name, b, ts, params, seed=1, tensor_name=key) for key, (b, ts) in samples.items()}
    backward = {key: run(name, b, ts, params, seed=1, tensor_name=key)
                for key, (b, ts) in reversed(samples.items())}
    assert all(same_bytes(forward[key], backward[key]) for key in samples)


def test_each_model_gets_its_own_mask() -> None:
    base = torch.zeros(50, 40)
    tau = torch.ones(50, 40)
    merged = run("dare_linear", base, [tau, 2 * tau], [{"weight": 1.0, "density": 0.5}] * 2,
                 {"rescale": False}, seed=3)
    assert {0.0, 1.0, 2.0, 3.0} == set(merged.unique().tolist())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device; the CPU run above "
                    "checks determinism, this checks that the device does not change the draw")
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_masks_do_not_depend_on_the_device(name: str) -> None:
    base, tensors = sample(13, 2, (40, 30))
    params = [{"weight": 1.0, "density": 0.5}] * 2
    cpu = run(name, base, tensors, params, {"rescale": False}, seed=2)
    cuda = run(name, base.cuda(), [t.cuda() for t in tensors], params, {"rescale": False}, seed=2)
    assert torch.equal((cpu != base), (cuda.cpu() != base))


# -- end to end ---------------------------------------------------------------------------------------


MODEL_PARAMETERS = {
    "task_arithmetic": [{"weight": 0.7}, {"weight": 0.4}],
    "ties": [{"weight": 1.0, "density": 0.5}, {"weight": 0.6, "density": 0.3}],
    "breadcrumbs": [{"weight": 0.6, "density": 0.8, "gamma": 0.05}, {"weight": 0.4, "density": 0.5}],
    "breadcrumbs_ties": [{"weight": 0.6, "density": 0.8, "gamma": 0.05}, {"weight": 0.4, "density": 0.5}],
}


def merge_tiny(tiny_models: dict[str, Path], tmp_path: Path, method: str, model_params: list[dict],
               parameters: str = "", *, seed: int = 0, out: str = "out") -> dict[str, torch.Tensor]:
    entries = "".join(f"  - model: {tiny_models[name]}\n    parameters: {params}\n".replace("'", "")
                      for name, params in zip(["math", "code"], model_params, strict=False))
    if not model_params:
        entries = f"  - model: {tiny_models['math']}\n  - model: {tiny_models['code']}\n"
    text = f"merge_method: {method}\nbase_model: {tiny_models['base']}\nmodels:\n{entries}"
    text += f"parameters:\n{parameters}" if parameters else ""
    fusekit.merge(write_recipe(tmp_path / f"{out}.yaml", text), tmp_path / out, random_seed=seed)
    return load_weights(tmp_path / out)


@pytest.mark.parametrize("method", list(MODEL_PARAMETERS))
def test_weighted_methods_end_to_end(tiny_models: dict[str, Path], tmp_path: Path, method: str) -> None:
    model_params = MODEL_PARAMETERS[method]
    merged = merge_tiny(tiny_models, tmp_path, method, model_params, "  lambda: 0.9\n  rescale: true\n")
    base = load_weights(tiny_models["base"])
    models = [load_weights(tiny_models[name]) for name in ("math", "code")]
    sparsifier, consensus = ROWS[method]
    assert sorted(merged) == sorted(base)
    for name, tensor in merged.items():
        expected, bound = ref_merge(base[name], [m[name] for m in models], model_params,
                                    sparsifier=sparsifier, consensus=consensus, normalize=method == "ties",
                                    rescale=method != "task_arithmetic", lambda_=0.9)
        assert_within(tensor, expected, bound)


def test_sce_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    merged = merge_tiny(tiny_models, tmp_path, "sce", [], "  select_topk: 0.4\n")
    base = load_weights(tiny_models["base"])
    models = [load_weights(tiny_models[name]) for name in ("math", "code")]
    for name, tensor in merged.items():
        expected, bound = ref_sce(base[name], [m[name] for m in models], 0.4)
        assert_within(tensor, expected, bound)


@pytest.mark.parametrize("method", STOCHASTIC)
def test_stochastic_methods_end_to_end(tiny_models: dict[str, Path], tmp_path: Path, method: str) -> None:
    params = [{"weight": 1.0, "density": 0.4}, {"weight": 0.5, "density": 0.6}]
    first = merge_tiny(tiny_models, tmp_path, method, params, "  rescale: false\n", seed=7, out="a")
    again = merge_tiny(tiny_models, tmp_path, method, params, "  rescale: false\n", seed=7, out="b")
    other = merge_tiny(tiny_models, tmp_path, method, params, "  rescale: false\n", seed=8, out="c")
    base = load_weights(tiny_models["base"])
    assert sorted(first) == sorted(base)
    assert all(same_bytes(first[name], again[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)
    embed = "model.embed_tokens.weight"
    changed = float((first[embed] != base[embed]).double().mean())
    expected = 1 - 0.6 * 0.4  # an entry stays the base's only if both models drop it
    assert abs(changed - expected) < 5 * math.sqrt(expected * (1 - expected) / base[embed].numel())


def test_ties_on_bf16_models_writes_bf16(bf16_models: dict[str, Path], tmp_path: Path) -> None:
    merged = merge_tiny(bf16_models, tmp_path, "ties", MODEL_PARAMETERS["ties"])
    base = load_weights(bf16_models["base"])
    assert all(tensor.dtype == torch.bfloat16 for tensor in merged.values())
    assert any(not torch.equal(merged[name], base[name]) for name in merged)
