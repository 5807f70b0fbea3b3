"""model_stock, nearswap, arcee_fusion, ram and ramplus_tl, checked against float64 references.

The references restate mergekit 0.1.5's definitions in float64, element by element or row by row,
and never call fusekit. With base ``b``, models ``m_i`` and task vectors ``τ_i = m_i − b``:

- model_stock: ``c`` = mean over pairs of ``clamp(⟨τ_i, τ_j⟩ / max(‖τ_i‖‖τ_j‖, 1e-6), −1, 1)``
  (per tensor, or per last-axis row with filter_wise); ``t = N c / (1 + (N − 1) c)``, 0 where the
  denominator's magnitude is below 1e-6; result ``t · mean(m) + (1 − t) · b``.
- nearswap: ``w = clamp(t / max(|b − m|, 1e-6), 0, 1)``; result ``w m + (1 − w) b``.
- arcee_fusion: ``importance = |m − b| · Σ_row p log(p / q)`` with ``p, q = softmax_row(m), softmax_row(b)``
  plus 1e-8; keep ``m`` where importance ≥ ``Q2 + 1.5 (Q3 − Q1)`` (quartiles at sorted index
  ``⌊k (n − 1) / 4⌋``, sampled with replacement above 10⁶ elements), ``b`` elsewhere.
- ram: each element gets the mean of the ``τ_i`` with ``|τ_i| > ε`` (ε = 1e-5 by default).
- ramplus_tl: as ram, but an element changed by one model only is scaled by
  ``λ_i = 1 + r · clamp(shared_i / max(unique_i, ε), 0, α)`` (r = 0.1, α = 0.2 by default).
"""

from __future__ import annotations

import itertools
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
from fusekit.recipe import parse_merge_recipe

EPS32 = torch.finfo(torch.float32).eps
METHODS = ("model_stock", "nearswap", "arcee_fusion", "ram", "ramplus_tl")
SHAPES = [(7, 5), (11,), (2, 3, 4), (1, 6)]


# -- helpers ------------------------------------------------------------------------------------------


def run(name: str, base: torch.Tensor, tensors: list[torch.Tensor], params: dict | None = None, *,
        seed: int = 0, tensor_name: str = "w") -> torch.Tensor:
    method = get_method(name)
    return method.kernel(MergeInputs(
        tensors=tensors, model_params=[method.model_params.model_validate({}) for _ in tensors],
        params=method.method_params.model_validate(params or {}), base=base, seed=seed,
        tensor_name=tensor_name))


def sample(seed: int, count: int, shape: tuple[int, ...] = (7, 5)) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and ``count`` fine-tunes: task vectors with sign conflicts, exact zeros, negligible
    changes (1e-7, below every epsilon used here), sparse entries only one model changes, and an
    outlier."""
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    models = []
    for i in range(count):
        delta = 0.1 * torch.randn(shape, generator=gen)
        flat = delta.view(-1)
        flat[:2] = 0.0  # unchanged by everyone
        flat[2] = 1e-7  # a negligible change
        if flat.numel() > 6:
            flat[3 + i % 3] = 0.0  # changed by the other models only
            flat[6] = (-1) ** i * 0.5  # sign conflict
        if flat.numel() > 8 and i == 0:
            flat[8] = 1e3  # outlier
        models.append(base + delta)
    return base, models


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor | float) -> None:
    assert actual.shape == expected.shape
    error = (actual.double() - expected).abs()
    excess = error - bound
    assert torch.all(excess <= 0), (f"max error {float(error.max()):.3e}, "
                                    f"worst excess {float(excess.max()):.3e}")


def rounding_bound(*tensors: torch.Tensor, factor: float = 16.0) -> torch.Tensor:
    """factor · float32 eps · Σ|x|: the size of float32 rounding in a short expression of the xs."""
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor in tensors:
        total += tensor.double().abs()
    return factor * EPS32 * total + 1e-30


# -- float64 references ----------------------------------------------------------------------------------


def ref_model_stock(base: torch.Tensor, models: list[torch.Tensor], *, filter_wise: bool = False
                    ) -> torch.Tensor:
    b = base.double()
    rows_b = b.reshape(-1, b.shape[-1]) if filter_wise and b.dim() > 0 else b.reshape(1, -1)
    rows_m = [m.double().reshape(rows_b.shape) for m in models]
    n = len(models)
    out = torch.empty_like(rows_b)
    for r in range(rows_b.shape[0]):
        taus = [m[r] - rows_b[r] for m in rows_m]
        cosines = []
        for i, j in itertools.combinations(range(n), 2):
            dot = float((taus[i] * taus[j]).sum())
            norms = max(float(taus[i].norm()) * float(taus[j].norm()), 1e-6)
            cosines.append(min(1.0, max(-1.0, dot / norms)))
        c = math.fsum(cosines) / len(cosines)
        denominator = 1 + (n - 1) * c
        t = 0.0 if abs(denominator) < 1e-6 else n * c / denominator
        average = torch.stack([m[r] for m in rows_m]).sum(dim=0) / n
        out[r] = t * average + (1 - t) * rows_b[r]
    return out.reshape(base.shape)


def model_stock_bound(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    """Rounding in t (a ratio of float32 reductions) moves the result along (mean − base)."""
    average = torch.stack([m.double() for m in models]).mean(dim=0)
    spread = (average - base.double()).abs()
    return 1e-4 * spread + rounding_bound(base, average, factor=32)


def ref_nearswap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    a, b = base.double(), model.double()
    weight = (t / (a - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return weight * b + (1 - weight) * a


def ref_importance(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    b, m = base.double(), model.double()
    p = torch.softmax(m, dim=-1) + 1e-8
    q = torch.softmax(b, dim=-1) + 1e-8
    kl = (p * (p / q).log()).sum(dim=-1, keepdim=True)
    return (m - b).abs() * kl


def ref_threshold(scores: torch.Tensor) -> float:
    ordered = sorted(scores.reshape(-1).tolist())
    last = len(ordered) - 1
    q1, q2, q3 = (ordered[math.floor(k * last / 4)] for k in (1, 2, 3))
    return q2 + 1.5 * (q3 - q1)


def assert_arcee_matches(result: torch.Tensor, base: torch.Tensor, model: torch.Tensor, *,
                         band: float = 1e-4) -> None:
    """Elements whose importance is clearly above the threshold are the model's, clearly below
    the base's; within ``band`` (relative) of the threshold float32 rounding may go either way.
    Every element is one or the other."""
    scores = ref_importance(base, model)
    threshold = ref_threshold(scores)
    margin = band * abs(threshold) + 1e-12
    keep = scores >= threshold + margin
    drop = scores < threshold - margin
    keep, drop = keep.expand_as(result), drop.expand_as(result)
    assert torch.equal(result[drop], base.to(result.dtype)[drop])
    assert_close64(result[keep], model.double()[keep], rounding_bound(base[keep], model[keep], factor=2))
    changed = result != base.to(result.dtype)
    assert_close64(result[changed], model.double()[changed],
                   rounding_bound(base[changed], model[changed], factor=2))
    assert int((keep | drop).sum()) >= 0.8 * result.numel()


def ref_ram(base: torch.Tensor, models: list[torch.Tensor], *, epsilon: float = 1e-5,
            plus: dict[str, float] | None = None) -> torch.Tensor:
    b = base.double().reshape(-1)
    taus = [m.double().reshape(-1) - b for m in models]
    active = [tau.abs() > epsilon for tau in taus]
    count = torch.stack(active).long().sum(dim=0)  # contributors per element
    scales = [1.0] * len(models)
    if plus is not None:
        for i, a in enumerate(active):
            shared, unique = int((a & (count > 1)).sum()), int((a & (count == 1)).sum())
            ratio = shared / max(unique, epsilon)
            scales[i] = 1 + plus["r"] * min(max(ratio, 0.0), plus["alpha"])
    merged = torch.zeros_like(b)
    for e in range(b.numel()):
        c = int(count[e])
        for i, tau in enumerate(taus):
            if active[i][e]:
                merged[e] += tau[e] * (scales[i] if c == 1 else 1 / c)
    return (b + merged).reshape(base.shape)


def ram_bound(base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    return rounding_bound(base, *models, factor=8)


# -- registry ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "low", "high", "defaults", "stochastic"), [
    ("model_stock", 2, None, {"filter_wise": False}, False),
    ("nearswap", 1, 1, {"t": 0.25}, False),  # t is required: no default
    ("arcee_fusion", 1, 1, {}, True),
    ("ram", 0, None, {"epsilon": 1e-5}, False),
    ("ramplus_tl", 0, None, {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}, False),
])
def test_registration_matches_mergekit(name: str, low: int, high: int | None, defaults: dict,
                                       stochastic: bool) -> None:
    method = get_method(name)
    assert method.base == "required"
    assert (method.min_models, method.max_models) == (low, high)
    assert method.stochastic is stochastic
    required = {"t": 0.25} if name == "nearswap" else {}
    assert method.method_params.model_validate(required).model_dump() == defaults
    assert set(method.parameter_names()) == set(defaults)


def test_nearswap_needs_t() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        get_method("nearswap").method_params.model_validate({})


# -- model_stock ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [2, 3, 4])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_model_stock_matches_reference(count: int, filter_wise: bool, shape: tuple[int, ...]) -> None:
    base, models = sample(10 + count, count, shape)
    result = run("model_stock", base, models, {"filter_wise": filter_wise})
    assert result.dtype == torch.float32
    assert_close64(result, ref_model_stock(base, models, filter_wise=filter_wise),
                   model_stock_bound(base, models))


def test_model_stock_filter_wise_measures_one_angle_per_row() -> None:
    # row 0: the two task vectors agree (t = 1, the average); row 1: they are orthogonal (t = 0,
    # the base). One angle for the whole tensor would mix the rows.
    base = torch.zeros(2, 2)
    first = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    second = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    row_wise = run("model_stock", base, [first, second], {"filter_wise": True})
    torch.testing.assert_close(row_wise, torch.tensor([[1.5, 0.0], [0.0, 0.0]]))
    whole = run("model_stock", base, [first, second])
    c = 2.0 / (math.sqrt(2) * math.sqrt(5))  # one cosine over the flattened tensor
    t = 2 * c / (1 + c)
    torch.testing.assert_close(whole.double(), t * (first + second).double() / 2)


def test_model_stock_opposite_task_vectors_keep_the_base() -> None:
    # two models, τ_2 = −τ_1: cos = −1, the denominator 1 + cos is 0, so t = 0.
    base, (model,) = sample(3, 1)
    mirrored = 2 * base - model
    result = run("model_stock", base, [model, mirrored])
    assert torch.equal(result, base)


def test_model_stock_singular_rows_alone_keep_the_base_when_filter_wise() -> None:
    base, models = sample(4, 2, (5, 6))
    models[1][0] = 2 * base[0] - models[0][0]  # row 0 is singular, the others are not
    result = run("model_stock", base, models, {"filter_wise": True})
    assert torch.equal(result[0], base[0])
    assert_close64(result, ref_model_stock(base, models, filter_wise=True), model_stock_bound(base, models))
    assert not torch.equal(result[1:], base[1:])


def test_model_stock_floors_tiny_norm_products() -> None:
    # ‖τ_1‖‖τ_2‖ = 2e-8 < 1e-6: cos = 2e-8 / 1e-6 = 0.02 instead of 1, so t = 0.04 / 1.02.
    base = torch.zeros(4)
    model = torch.tensor([1e-4, 1e-4, 0.0, 0.0])
    result = run("model_stock", base, [model, model.clone()])
    expected = ref_model_stock(base, [model, model])
    assert_close64(result, expected, 1e-4 * expected.abs())
    assert float(result[0]) == pytest.approx(1e-4 * 0.04 / 1.02, rel=1e-5)


def test_model_stock_zero_task_vectors_return_the_base() -> None:
    base, _ = sample(5, 0)
    assert torch.equal(run("model_stock", base, [base.clone(), base.clone(), base.clone()]), base)


def test_model_stock_computes_in_the_input_dtype() -> None:
    base, models = sample(6, 3)
    half = [t.to(torch.bfloat16) for t in (base, *models)]
    result = run("model_stock", half[0], half[1:])
    assert result.dtype == torch.bfloat16
    expected = ref_model_stock(half[0], half[1:])
    assert_close64(result, expected, 0.05 * expected.abs() + 1e-2)


shapes = st.sampled_from(SHAPES)


@given(seed=st.integers(0, 2**31 - 1), shape=shapes, count=st.integers(2, 4), filter_wise=st.booleans())
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_model_stock_of_identical_models_returns_the_model(seed: int, shape: tuple[int, ...], count: int,
                                                           filter_wise: bool) -> None:
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    model = base + torch.randn(shape, generator=gen)
    result = run("model_stock", base, [model.clone() for _ in range(count)], {"filter_wise": filter_wise})
    assert_close64(result, model.double(), rounding_bound(base, model, factor=16))


# -- nearswap ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.05, 0.5, 2e-7, 0.0, -1.0, 1e4])
@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_matches_reference(t: float, shape: tuple[int, ...]) -> None:
    base, (model,) = sample(20, 1, shape)
    result = run("nearswap", base, [model], {"t": t})
    assert result.dtype == torch.float32
    assert_close64(result, ref_nearswap(base, model, t), rounding_bound(base, model, factor=8))


def test_nearswap_takes_close_values_from_the_model_and_pulls_far_ones_to_the_base() -> None:
    base = torch.tensor([1.0, 1.0, 1.0, -2.0, 0.0])
    model = torch.tensor([1.05, 0.99, 2.0, 2.0, 0.0])
    result = run("nearswap", base, [model], {"t": 0.1})
    # |diff| = 0.05, 0.01 → model; 1.0 → w = 0.1; 4.0 → w = 0.025; 0 → w = 1 (the values agree)
    expected = torch.tensor([1.05, 0.99, 1.0 + 0.1 * 1.0, -2.0 + 0.025 * 4.0, 0.0])
    torch.testing.assert_close(result, expected)
    assert torch.equal(result[:2], model[:2])


def test_nearswap_negative_t_returns_the_base() -> None:
    base, (model,) = sample(21, 1)
    assert torch.equal(run("nearswap", base, [model], {"t": -0.5}), base)


def test_nearswap_computes_in_the_input_dtype() -> None:
    base, (model,) = sample(22, 1)
    result = run("nearswap", base.half(), [model.half()], {"t": 0.05})
    assert result.dtype == torch.float16
    expected = ref_nearswap(base.half(), model.half(), 0.05)
    assert_close64(result, expected, 4e-3 * (expected.abs() + base.double().abs()) + 1e-3)


@given(seed=st.integers(0, 2**31 - 1), shape=shapes,
       t=st.one_of(st.floats(2e-6, 1e3), st.floats(-1e3, 0.0)))
@settings(max_examples=50, deadline=None)
def test_nearswap_of_identical_inputs_returns_them(seed: int, shape: tuple[int, ...], t: float) -> None:
    # |a − a| = 0 is floored at 1e-6, so w = 1 for t ≥ ~1e-6 and 0 for t ≤ 0: exactly the input.
    # (For 0 < t < 1e-6, w·a + (1 − w)·a is the input up to rounding only.)
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run("nearswap", tensor, [tensor.clone()], {"t": t}), tensor)


# -- arcee_fusion -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(7, 5), (40,), (3, 6, 8), (64, 32)])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_arcee_fusion_matches_reference(shape: tuple[int, ...], seed: int) -> None:
    base, (model,) = sample(30 + seed, 1, shape)
    # rows with differently sized changes, so the row KL factor matters
    model = base + (model - base) * torch.linspace(0.1, 3.0, shape[-1])
    result = run("arcee_fusion", base, [model])
    assert result.dtype == torch.float32
    assert_arcee_matches(result, base, model)
    kept = int((result != base).sum())
    assert 0 < kept < result.numel() // 2


def test_arcee_fusion_keeps_only_upper_outliers() -> None:
    base = torch.zeros(1, 8)
    model = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 5.0]])
    result = run("arcee_fusion", base, [model])
    # importance ∝ |change| (one row, one KL factor): Q1 = Q2 = Q3, threshold = that value, so
    # every element at or above it is kept
    assert torch.equal(result, model)
    model2 = torch.tensor([[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 5.0]])
    result2 = run("arcee_fusion", base, [model2])
    assert torch.equal(result2, torch.tensor([[0.0, 0, 0, 0, 0, 0, 0, 5.0]]))


def test_arcee_fusion_half_precision_gives_float32_like_mergekit() -> None:
    base, (model,) = sample(33, 1, (16, 12))
    b16, m16 = base.bfloat16(), model.bfloat16()
    result = run("arcee_fusion", b16, [m16])
    assert result.dtype == torch.float32  # mergekit's mask is float32 and promotes the sum
    kept = result != b16.float()
    # a kept element is b + (m − b) with the difference rounded to bf16, then added in float32
    expected = b16.float() + (m16 - b16).float()
    assert torch.equal(result[kept], expected[kept])
    assert 0 < int(kept.sum()) < kept.numel()


@given(seed=st.integers(0, 2**31 - 1), shape=shapes)
@settings(max_examples=40, deadline=None)
def test_arcee_fusion_of_identical_inputs_returns_them(seed: int, shape: tuple[int, ...]) -> None:
    # no change means zero importance, a zero threshold, every element "kept": b + 0 = b.
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run("arcee_fusion", tensor, [tensor.clone()]), tensor)


def test_arcee_fusion_samples_quartiles_of_large_tensors_reproducibly() -> None:
    gen = torch.Generator().manual_seed(7)
    base = torch.randn(1001, 1000, generator=gen)  # 1,001,000 elements: above the 10⁶ sample
    model = base + 0.01 * torch.randn(1001, 1000, generator=gen) * torch.rand(1001, 1, generator=gen)
    first = run("arcee_fusion", base, [model], seed=1, tensor_name="a")
    assert torch.equal(first, run("arcee_fusion", base, [model], seed=1, tensor_name="a"))
    other = run("arcee_fusion", base, [model], seed=2, tensor_name="a")
    assert not torch.equal(first, other)
    # the sampled threshold is close to the exact one: the kept sets differ in very few elements
    scores = ref_importance(base, model)
    exact_keep = scores >= exact_threshold(scores)
    for merged in (first, other):
        kept = merged != base
        assert float((kept != exact_keep).double().mean()) < 2e-3
        assert 0.01 < float(kept.double().mean()) < 0.5


def exact_threshold(scores: torch.Tensor) -> float:
    ordered = scores.reshape(-1).sort().values
    last = ordered.numel() - 1
    q1, q2, q3 = (float(ordered[k * last // 4]) for k in (1, 2, 3))
    return q2 + 1.5 * (q3 - q1)


# -- ram / ramplus_tl -------------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 3, 4])
@pytest.mark.parametrize("epsilon", [1e-5, 0.05])
def test_ram_matches_reference(count: int, epsilon: float) -> None:
    base, models = sample(40 + count, count, (9, 7))
    result = run("ram", base, models, {"epsilon": epsilon})
    assert result.dtype == torch.float32
    assert_close64(result, ref_ram(base, models, epsilon=epsilon), ram_bound(base, models))


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize(("r", "alpha", "epsilon"), [(0.1, 0.2, 1e-5), (0.5, 10.0, 1e-5),
                                                     (2.0, 0.05, 0.08), (0.0, 0.2, 1e-5)])
def test_ramplus_tl_matches_reference(count: int, r: float, alpha: float, epsilon: float) -> None:
    base, models = sample(50 + count, count, (9, 7))
    plus = {"r": r, "alpha": alpha}
    result = run("ramplus_tl", base, models, {**plus, "epsilon": epsilon})
    assert result.dtype == torch.float32
    assert_close64(result, ref_ram(base, models, epsilon=epsilon, plus=plus), ram_bound(base, models))


def test_ram_averages_only_the_changes_above_epsilon() -> None:
    base = torch.zeros(5)
    first = torch.tensor([0.4, 1e-6, 0.3, 0.0, -0.2])
    second = torch.tensor([0.2, 0.6, -0.3, 0.0, 1e-6])
    result = run("ram", base, [first, second])
    torch.testing.assert_close(result, torch.tensor([0.3, 0.6, 0.0, 0.0, -0.2]))
    # a change of exactly epsilon does not count (the test is |τ| > ε)
    at_epsilon = run("ram", base, [torch.tensor([0.25, 0.5, 0, 0, 0]), torch.tensor([0.5, 0.5, 0, 0, 0])],
                     {"epsilon": 0.25})
    torch.testing.assert_close(at_epsilon, torch.tensor([0.5, 0.5, 0.0, 0.0, 0.0]))


def test_ramplus_tl_scales_unique_changes_by_the_shared_to_unique_ratio() -> None:
    base = torch.zeros(6)
    first = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.0, 0.0])  # shared 3, unique 1 → ρ = 3
    second = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.4, 0.2])  # shared 3, unique 2 → ρ = 1.5
    result = run("ramplus_tl", base, [first, second], {"r": 0.5, "alpha": 2.0})
    torch.testing.assert_close(result, torch.tensor([1.0, 1.0, 1.0, 0.5 * 2.0, 0.4 * 1.75, 0.2 * 1.75]))


def test_ramplus_tl_caps_the_ratio_at_alpha() -> None:
    base = torch.zeros(3)
    first = torch.tensor([1.0, 1.0, 0.0])  # no unique element: ρ = 2 / ε, and nothing to scale
    second = torch.tensor([1.0, 1.0, 0.7])  # ρ = 2 / 1, capped at α = 0.2: λ = 1 + 0.1 · 0.2
    result = run("ramplus_tl", base, [first, second])
    torch.testing.assert_close(result, torch.tensor([1.0, 1.0, 0.7 * 1.02]))


def test_ram_and_ramplus_half_precision_dtypes_follow_mergekit() -> None:
    base, models = sample(60, 2)
    half = [t.bfloat16() for t in (base, *models)]
    assert run("ram", half[0], half[1:]).dtype == torch.bfloat16
    assert run("ramplus_tl", half[0], half[1:]).dtype == torch.float32  # λ is float32 in mergekit


def test_ram_without_other_models_returns_the_base() -> None:
    base, _ = sample(61, 0)
    assert torch.equal(run("ram", base, []), base)
    assert torch.equal(run("ramplus_tl", base, []), base)


def test_ramplus_tl_zero_epsilon_with_an_unchanged_model_stays_finite() -> None:
    # mergekit divides 0 by 0 here (ρ = NaN) and returns NaN everywhere; fusekit uses λ = 1.
    base, (model,) = sample(62, 1)
    result = run("ramplus_tl", base, [model, base.clone()], {"epsilon": 0.0})
    assert torch.isfinite(result).all()
    assert_close64(result, ref_ram(base, [model], epsilon=0.0), ram_bound(base, [model]))


@given(seed=st.integers(0, 2**31 - 1), shape=shapes, count=st.integers(1, 4),
       name=st.sampled_from(["ram", "ramplus_tl"]))
@settings(max_examples=50, deadline=None)
def test_ram_of_models_equal_to_the_base_returns_the_base(seed: int, shape: tuple[int, ...], count: int,
                                                         name: str) -> None:
    tensor = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(name, tensor, [tensor.clone() for _ in range(count)]), tensor)


@given(seed=st.integers(0, 2**31 - 1), shape=shapes, count=st.integers(1, 4),
       name=st.sampled_from(["ram", "ramplus_tl"]))
@settings(max_examples=50, deadline=None)
def test_ram_of_identical_models_returns_the_model(seed: int, shape: tuple[int, ...], count: int,
                                                  name: str) -> None:
    # all models equal m: every change is shared by all (or made by the only model, λ = 1), so
    # each element is b + n·τ / n = m up to rounding.
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=gen)
    model = base + torch.randn(shape, generator=gen)
    result = run(name, base, [model.clone() for _ in range(count)])
    assert_close64(result, model.double(), rounding_bound(base, model, factor=4))


# -- end to end ---------------------------------------------------------------------------------------


def recipe_text(method: str, models: list[Path], base: Path, parameters: str = "") -> str:
    listed = "".join(f"  - model: {m}\n" for m in models)
    text = f"merge_method: {method}\nbase_model: {base}\nmodels:\n{listed}"
    return text + (f"parameters:\n{parameters}" if parameters else "")


def merged_and_inputs(tiny_models: dict[str, Path], tmp_path: Path, method: str, names: list[str],
                      parameters: str = "") -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor],
                                                     list[dict[str, torch.Tensor]]]:
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text(
        method, [tiny_models[n] for n in names], tiny_models["base"], parameters))
    fusekit.merge(recipe, tmp_path / "out", random_seed=0)
    merged = load_weights(tmp_path / "out")
    base = load_weights(tiny_models["base"])
    models = [load_weights(tiny_models[n]) for n in names]
    assert sorted(merged) == sorted(base)
    return merged, base, models


@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_end_to_end(tiny_models: dict[str, Path], tmp_path: Path, filter_wise: bool) -> None:
    merged, base, models = merged_and_inputs(tiny_models, tmp_path, "model_stock", ["math", "code"],
                                             f"  filter_wise: {str(filter_wise).lower()}\n")
    for name, tensor in merged.items():
        inputs = [m[name] for m in models]
        expected = ref_model_stock(base[name], inputs, filter_wise=filter_wise)
        assert tensor.dtype == torch.float32
        assert_close64(tensor, expected, model_stock_bound(base[name], inputs))


def test_nearswap_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    merged, base, (model,) = merged_and_inputs(tiny_models, tmp_path, "nearswap", ["math"], "  t: 0.002\n")
    mixed = 0
    for name, tensor in merged.items():
        expected = ref_nearswap(base[name], model[name], 0.002)
        assert_close64(tensor, expected, rounding_bound(base[name], model[name], factor=8))
        mixed += int(((tensor != base[name]) & (tensor != model[name])).sum())
    assert mixed > 0


def test_arcee_fusion_end_to_end(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    merged, base, (model,) = merged_and_inputs(tiny_models, tmp_path, "arcee_fusion", ["math"])
    kept = sum(int((tensor != base[name]).sum()) for name, tensor in merged.items())
    assert 0.05 < kept / sum(t.numel() for t in merged.values()) < 0.3
    for name, tensor in merged.items():
        if torch.equal(base[name], model[name]):
            assert torch.equal(tensor, base[name])
            continue
        # the row KL of the demo models' near-uniform softmaxes is ~1e-6, which float32 (as in
        # mergekit) resolves to a few percent: decisions within 10% of the threshold may differ.
        assert_arcee_matches(tensor, base[name], model[name], band=0.1)


@pytest.mark.parametrize(("method", "parameters", "plus"), [
    ("ram", "  epsilon: 0.003\n", None),
    ("ramplus_tl", "  epsilon: 0.003\n  r: 0.5\n  alpha: 0.5\n", {"r": 0.5, "alpha": 0.5}),
])
def test_ram_end_to_end(tiny_models: dict[str, Path], tmp_path: Path, method: str, parameters: str,
                        plus: dict[str, float] | None) -> None:
    merged, base, models = merged_and_inputs(tiny_models, tmp_path, method, ["math", "code"], parameters)
    for name in ["model.layers.0.self_attn.q_proj.weight", "model.norm.weight",
                 "model.layers.1.mlp.down_proj.weight"]:
        inputs = [m[name] for m in models]
        expected = ref_ram(base[name], inputs, epsilon=0.003, plus=plus)
        assert_close64(merged[name], expected, ram_bound(base[name], inputs))
    for tensor in merged.values():
        assert torch.isfinite(tensor).all()


# -- load-time errors ---------------------------------------------------------------------------------


def load_error(text: str) -> RecipeError:
    with pytest.raises(RecipeError) as info:
        parse_merge_recipe(text, "r.yaml", strict=True)
    assert info.value.exit_code == 2
    return info.value


@pytest.mark.parametrize(("method", "models", "message"), [
    ("model_stock", ["a"], "model_stock needs at least 2 models besides the base, got 1"),
    ("nearswap", ["a", "b"], "nearswap takes exactly 1 model besides the base, got 2"),
    ("arcee_fusion", ["a", "b"], "arcee_fusion takes exactly 1 model besides the base, got 2"),
    ("arcee_fusion", [], "arcee_fusion needs at least 1 model besides the base, got 0"),
])
def test_wrong_model_counts_fail_when_the_recipe_loads(method: str, models: list[str], message: str) -> None:
    listed = "".join(f"  - model: org/{m}\n" for m in ["base", *models])
    params = "parameters:\n  t: 0.1\n" if method == "nearswap" else ""
    error = load_error(f"merge_method: {method}\nbase_model: org/base\nmodels:\n{listed}{params}")
    assert message in str(error)


@pytest.mark.parametrize("method", METHODS)
def test_methods_need_a_base_model(method: str) -> None:
    text = f"merge_method: {method}\nmodels:\n  - model: org/a\n  - model: org/b\n  - model: org/c\n"
    assert "needs a base model" in str(load_error(text))


@pytest.mark.parametrize(("method", "parameters", "fragment"), [
    ("model_stock", "  filter_wise: sometimes\n", "filter_wise"),
    ("ram", "  r: 0.1\n", "ram does not take 'r'"),  # another method's parameter: --strict refuses it
    ("ram", "  rr: 0.1\n", "'rr' is not a parameter of ram"),
    ("ramplus_tl", "  epsilon: tiny\n", "epsilon"),
    ("nearswap", "  t: [0.1, nope]\n", "t"),
    ("arcee_fusion", "  t: 0.1\n", "arcee_fusion does not take 't'"),
])
def test_bad_parameters_fail_when_the_recipe_loads(method: str, parameters: str, fragment: str) -> None:
    others = ["a", "b"] if method in {"model_stock", "ram", "ramplus_tl"} else ["a"]
    listed = "".join(f"  - model: org/{m}\n" for m in ["base", *others])
    text = f"merge_method: {method}\nbase_model: org/base\nmodels:\n{listed}parameters:\n{parameters}"
    assert fragment in str(load_error(text))


def test_nearswap_without_t_is_a_clear_error(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml",
                          recipe_text("nearswap", [tiny_models["math"]], tiny_models["base"]))
    with pytest.raises(RecipeError, match="nearswap needs parameter 't'") as info:
        fusekit.plan_merge(recipe)
    assert info.value.exit_code == 2
