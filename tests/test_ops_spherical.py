"""Spherical merges (slerp, nuslerp, multislerp, karcher) against float64 references.

The references below are written from mergekit 0.1.5's definitions, in float64, one vector at a
time, without chunking and without calling fusekit:

* slerp: ``cos Ω = <a/‖a‖, b/‖b‖>`` (a norm ≤ 1e-8 counts as 1); if ``|cos Ω| > 0.9995`` the result
  is ``(1−t)a + tb``, else ``sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b``.
* nuslerp: the same per vector (flattened tensor, rows, or columns), vectors normalised by
  ``max(‖v‖, 1e-7)``, colinear when ``1 − cos² ≤ 1e-16``, ``t = w2/(w1+w2)`` (0.5 when the sum is
  below 1e-6), on task vectors when there is a base.
* multislerp: ``u_i = x_i/(‖x_i‖+ε)``, ``m`` = normalised ``Σ w_i u_i``,
  ``v = Σ w_i (u_i − <u_i,m> m)``, result ``(Σ w_i ‖x_i‖)(cos(‖v‖+ε) m + sin(‖v‖+ε)/(‖v‖+ε) v)``.
* karcher: equal weights, fixed-point steps ``m ← exp_m(Σ α_i θ_i/sin θ_i (u_i − cos θ_i m))``
  from the normalised Euclidean mean, result ``(Σ α_i ‖x_i‖) m``; checked also against the
  closed form for two models (the geodesic midpoint) and the first-order optimality condition.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import load_weights, write_recipe
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

import fusekit
from fusekit.errors import FusekitError, RecipeError
from fusekit.ops import MergeInputs, get_method
from fusekit.ops.registry import NoParams
from fusekit.ops.spherical import (
    KarcherParams,
    MultislerpParams,
    NuslerpParams,
    SlerpParams,
    WeightModelParams,
)
from fusekit.recipe import parse_merge_recipe

F64: dict[str, Any] = {"rtol": 1e-10, "atol": 1e-12}
F32: dict[str, Any] = {"rtol": 2e-5, "atol": 2e-6}
PROPERTIES = settings(max_examples=60, deadline=None,
                      suppress_health_check=[HealthCheck.function_scoped_fixture])
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


# -- inputs ----------------------------------------------------------------------------------------


def awkward(seed: int, shape: tuple[int, ...] = (6, 10), *, like: torch.Tensor | None = None,
            dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Random values with zeros, a large outlier, and (given ``like``) sign conflicts with it."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=gen, dtype=torch.float64)
    if like is not None:
        x = like.double() + 0.8 * x
        flip = torch.rand(shape, generator=gen) < 0.25
        x[flip] = -x[flip]
    flat = x.view(-1)
    flat[torch.randperm(flat.numel(), generator=gen)[:3]] = 0.0
    flat[int(torch.randint(flat.numel(), (1,), generator=gen))] = 40.0
    return x.to(dtype)


def labelled(label: str) -> Callable[[str], str]:
    """An ``assert_close`` message callback that names what was compared."""
    return lambda message: f"{label}: {message}"


def run(name: str, tensors: list[torch.Tensor], params: BaseModel, *,
        weights: list[float] | None = None, base: torch.Tensor | None = None) -> torch.Tensor:
    model_params: list[BaseModel] = ([WeightModelParams(weight=w) for w in weights]
                                     if weights is not None else [NoParams()] * len(tensors))
    return get_method(name).kernel(MergeInputs(tensors=tensors, model_params=model_params,
                                               params=params, base=base))


# -- references ------------------------------------------------------------------------------------


def ref_slerp_vector(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """mergekit's slerp of two whole tensors, flattened, in float64."""
    norm_a = float(np.linalg.norm(a)) or 1.0
    norm_b = float(np.linalg.norm(b)) or 1.0
    norm_a = norm_a if norm_a > 1e-8 else 1.0
    norm_b = norm_b if norm_b > 1e-8 else 1.0
    cos = min(1.0, max(-1.0, float(np.dot(a / norm_a, b / norm_b))))
    if abs(cos) > 0.9995:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_slerp(t: float, base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    a, b = base.double().numpy().ravel(), other.double().numpy().ravel()
    return torch.from_numpy(ref_slerp_vector(t, a, b).reshape(base.shape))


def ref_nuslerp_pair(t: float, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ua = a / max(float(np.linalg.norm(a)), 1e-7)
    ub = b / max(float(np.linalg.norm(b)), 1e-7)
    cos = min(1.0, max(-1.0, float(np.dot(ua, ub))))
    if 1 - cos * cos <= 1e-16:
        return (1 - t) * a + t * b
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)


def ref_nuslerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None, *,
                flatten: bool = True, row_wise: bool = False) -> torch.Tensor:
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    a, b = (x.double().numpy() for x in tensors)
    if base is not None:
        a, b = a - base.double().numpy(), b - base.double().numpy()
    if flatten or a.ndim == 1:
        out = ref_nuslerp_pair(t, a.ravel(), b.ravel()).reshape(a.shape)
    elif row_wise:  # vectors along dim 0: the columns of a matrix
        out = np.stack([ref_nuslerp_pair(t, a[:, j], b[:, j]) for j in range(a.shape[1])], axis=1)
    else:  # vectors along the last dim: the rows
        out = np.stack([ref_nuslerp_pair(t, a[i], b[i]) for i in range(a.shape[0])])
    if base is not None:
        out = out + base.double().numpy()
    return torch.from_numpy(out)


def ref_multislerp(tensors: list[torch.Tensor], weights: list[float], base: torch.Tensor | None,
                   *, normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].double()
    xs = np.stack([x.double().numpy().ravel() for x in tensors])  # (n, numel)
    origin = base.double().numpy().ravel() if base is not None else np.zeros(xs.shape[1])
    xs = xs - origin
    w = np.array(weights, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = np.linalg.norm(xs, axis=1)
    units = xs / (norms[:, None] + eps)
    mean = (w[:, None] * units).sum(0)
    if np.linalg.norm(mean) < eps:
        assert len(tensors) == 2
        out = w[0] * xs[0] + w[1] * xs[1]
    else:
        mean = mean / np.linalg.norm(mean)
        tangent = (w[:, None] * (units - (units @ mean)[:, None] * mean)).sum(0)
        length = np.linalg.norm(tangent) + eps
        out = (np.cos(length) * mean + np.sin(length) / length * tangent) * float(w @ norms)
    return torch.from_numpy((out + origin).reshape(tensors[0].shape))


def ref_karcher(tensors: list[torch.Tensor], *, max_iter: int = 10, tol: float = 1e-5
                ) -> torch.Tensor:
    if len(tensors) == 1:
        return tensors[0].double()
    xs = [x.double().numpy().ravel() for x in tensors]
    alphas = [1 / len(xs)] * len(xs)
    norms = [float(np.linalg.norm(x)) for x in xs]
    kept = [i for i, n in enumerate(norms) if n > tol]
    if not kept:
        return torch.zeros(tensors[0].shape, dtype=torch.float64)
    units = [xs[i] / norms[i] for i in kept]
    weights = [alphas[i] / sum(alphas[j] for j in kept) for i in kept]
    mean = np.sum([w * u for w, u in zip(weights, units, strict=True)], axis=0)
    mean = units[0] if np.linalg.norm(mean) < tol else mean / np.linalg.norm(mean)
    for _ in range(max_iter):
        tangent = np.zeros_like(mean)
        for w, u in zip(weights, units, strict=True):
            cos = min(1.0, max(-1.0, float(mean @ u)))
            theta = math.acos(cos)
            if theta >= tol:
                tangent += w * theta / math.sin(theta) * (u - cos * mean)
        length = float(np.linalg.norm(tangent))
        if length < tol:
            break
        mean = math.cos(length) * mean + math.sin(length) * tangent / length
        mean = mean / np.linalg.norm(mean)
    scale = math.fsum(a * n for a, n in zip(alphas, norms, strict=True))
    return torch.from_numpy((scale * mean).reshape(tensors[0].shape))


# -- registration ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "base", "low", "high", "names"), [
    ("slerp", "required", 1, 1, {"t": "method"}),
    ("nuslerp", "optional", 2, 2, {"weight": "model", "nuslerp_flatten": "method",
                                   "nuslerp_row_wise": "method"}),
    ("multislerp", "optional", 1, None, {"weight": "model", "normalize_weights": "method",
                                         "eps": "method"}),
    ("karcher", "unused", 1, None, {"max_iter": "method", "tol": "method"}),
])
def test_registration_matches_mergekit_contract(name: str, base: str, low: int, high: int | None,
                                                names: dict[str, str]) -> None:
    method = get_method(name)
    assert (method.base, method.min_models, method.max_models) == (base, low, high)
    assert method.parameter_names() == names
    assert not method.stochastic


def test_defaults_match_mergekit() -> None:
    assert NuslerpParams().model_dump() == {"nuslerp_flatten": True, "nuslerp_row_wise": False}
    assert MultislerpParams().model_dump() == {"normalize_weights": True, "eps": 1e-8}
    assert KarcherParams().model_dump() == {"max_iter": 10, "tol": 1e-5}
    with pytest.raises(ValueError, match="t"):
        SlerpParams()  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="weight"):
        WeightModelParams()  # type: ignore[call-arg]


# -- slerp -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.1, 0.5, 0.77, 1.0, -0.25, 1.3])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_slerp_matches_reference(t: float, seed: int) -> None:
    base = awkward(seed)
    other = awkward(seed + 100, like=base)
    torch.testing.assert_close(run("slerp", [other], SlerpParams(t=t), base=base),
                               ref_slerp(t, base, other), **F64)
    out32 = run("slerp", [other.float()], SlerpParams(t=t), base=base.float())
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref_slerp(t, base.float(), other.float()), **F32)


@pytest.mark.parametrize("scale", [3.0, 0.25, -2.0, -0.5])
@pytest.mark.parametrize("t", [0.3, 0.5])
def test_slerp_colinear_and_antipodal_pairs_interpolate_linearly(scale: float, t: float) -> None:
    base = awkward(3)
    other = scale * base
    expected = (1 - t) * base + t * other
    torch.testing.assert_close(run("slerp", [other], SlerpParams(t=t), base=base), expected, **F64)


def _at_angle(cos: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Two vectors of lengths 2 and 3 whose angle has the given cosine."""
    a = torch.tensor([2.0, 0.0, 0.0], dtype=torch.float64)
    b = 3 * torch.tensor([cos, math.sqrt(1 - cos * cos), 0.0], dtype=torch.float64)
    return a, b


@pytest.mark.parametrize(("cos", "linear"), [(0.9996, True), (0.99949, False), (0.5, False),
                                             (-0.99951, True), (-0.9994, False)])
def test_slerp_dot_threshold_is_0_9995(cos: float, linear: bool) -> None:
    a, b = _at_angle(cos)
    t = 0.5
    out = run("slerp", [b], SlerpParams(t=t), base=a)
    theta = math.acos(cos)
    spherical = (math.sin((1 - t) * theta) * a + math.sin(t * theta) * b) / math.sin(theta)
    lerp = (1 - t) * a + t * b
    assert float((spherical - lerp).norm()) > 1e-6  # the two branches are distinguishable here
    torch.testing.assert_close(out, lerp if linear else spherical, **F64)


@pytest.mark.parametrize("t", [0.0, 0.3, 1.0])
def test_slerp_zero_tensor_counts_as_orthogonal(t: float) -> None:
    """A norm ≤ 1e-8 is replaced by 1, so the cosine is 0 and Ω = π/2."""
    base = torch.zeros(4, 5, dtype=torch.float64)
    other = awkward(4, (4, 5))
    expected = math.sin(t * math.pi / 2) * other  # the base term is zero
    torch.testing.assert_close(run("slerp", [other], SlerpParams(t=t), base=base), expected, **F64)
    tiny = torch.full((4, 5), 1e-10, dtype=torch.float64)
    torch.testing.assert_close(run("slerp", [other], SlerpParams(t=t), base=tiny),
                               ref_slerp(t, tiny, other), **F64)


def test_slerp_accepts_an_empty_tensor() -> None:
    empty = torch.zeros(0, 3)
    assert run("slerp", [empty], SlerpParams(t=0.5), base=empty).shape == (0, 3)


def test_slerp_over_a_million_elements_sums_in_chunks_correctly() -> None:
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(1100, 1000, generator=gen)  # 1.1M elements: two reduction chunks
    other = base + 0.7 * torch.randn(1100, 1000, generator=gen)
    out = run("slerp", [other], SlerpParams(t=0.4), base=base)
    torch.testing.assert_close(out.double(), ref_slerp(0.4, base, other), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_slerp_of_half_inputs_computes_in_float32_and_rounds_once(dtype: torch.dtype) -> None:
    base = awkward(6, dtype=dtype)
    other = awkward(7, like=base, dtype=dtype)
    out = run("slerp", [other], SlerpParams(t=0.35), base=base)
    assert out.dtype == dtype
    expected = run("slerp", [other.float()], SlerpParams(t=0.35), base=base.float()).to(dtype)
    assert torch.equal(out, expected)
    torch.testing.assert_close(out.double(), ref_slerp(0.35, base, other).to(dtype).double(),
                               rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


finite = st.floats(-1e3, 1e3, allow_nan=False, width=32)


@st.composite
def tensor_pairs(draw: st.DrawFn) -> tuple[torch.Tensor, torch.Tensor]:
    n = draw(st.integers(1, 24))
    a = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float32)
    b = torch.tensor(draw(st.lists(finite, min_size=n, max_size=n)), dtype=torch.float32)
    return a, b


@PROPERTIES
@given(pair=tensor_pairs())
def test_slerp_endpoints_return_the_base_and_the_other_model_exactly(
        pair: tuple[torch.Tensor, torch.Tensor]) -> None:
    base, other = pair
    assert torch.equal(run("slerp", [other], SlerpParams(t=0.0), base=base), base)
    assert torch.equal(run("slerp", [other], SlerpParams(t=1.0), base=base), other)


@PROPERTIES
@given(pair=tensor_pairs(), t=st.floats(0.0, 1.0))
def test_slerp_of_unit_vectors_stays_on_the_sphere(pair: tuple[torch.Tensor, torch.Tensor],
                                                   t: float) -> None:
    a, b = (x.double() for x in pair)
    if float(a.norm()) < 1e-3 or float(b.norm()) < 1e-3:
        return
    a, b = a / a.norm(), b / b.norm()
    if abs(float(a @ b)) > 0.9995:  # the linear fallback leaves the sphere by design
        return
    assert float(run("slerp", [b], SlerpParams(t=t), base=a).norm()) == pytest.approx(1.0, abs=1e-9)


# -- nuslerp ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (True, True), (False, False),
                                                   (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("weights", [(0.3, 0.7), (1.0, 1.0), (2.0, -0.5)])
def test_nuslerp_matches_reference(flatten: bool, row_wise: bool, with_base: bool,
                                   weights: tuple[float, float]) -> None:
    base = awkward(10)
    first, second = awkward(11, like=base), awkward(12, like=base)
    params = NuslerpParams(nuslerp_flatten=flatten, nuslerp_row_wise=row_wise)
    out = run("nuslerp", [first, second], params, weights=list(weights),
              base=base if with_base else None)
    expected = ref_nuslerp([first, second], list(weights), base if with_base else None,
                           flatten=flatten, row_wise=row_wise)
    torch.testing.assert_close(out, expected, **F64)


def test_nuslerp_modes_differ() -> None:
    """Flattened, per-row and per-column slerps give different results on generic input."""
    first, second = awkward(13), awkward(14)
    outs = [run("nuslerp", [first, second],
                NuslerpParams(nuslerp_flatten=f, nuslerp_row_wise=r), weights=[1.0, 2.0])
            for f, r in [(True, False), (False, False), (False, True)]]
    assert not torch.allclose(outs[0], outs[1]) and not torch.allclose(outs[1], outs[2])


def test_nuslerp_weights_summing_to_zero_use_t_half() -> None:
    first, second = awkward(15), awkward(16)
    out = run("nuslerp", [first, second], NuslerpParams(), weights=[1.0, -1.0])
    torch.testing.assert_close(out, ref_nuslerp([first, second], [0.5, 0.5], None), **F64)


def test_nuslerp_colinear_rows_interpolate_linearly() -> None:
    first = awkward(17)
    second = first.clone()
    second[0] = -3 * first[0]  # antipodal row
    second[1] = 0.5 * first[1]  # parallel row
    out = run("nuslerp", [first, second], NuslerpParams(nuslerp_flatten=False), weights=[1.0, 3.0])
    for row in (0, 1):
        torch.testing.assert_close(out[row], 0.25 * first[row] + 0.75 * second[row], **F64)
    expected = ref_nuslerp([first, second], [1.0, 3.0], None, flatten=False)
    torch.testing.assert_close(out[2:], expected[2:], **F64)


@pytest.mark.parametrize("t_weights", [(1.0, 0.0), (0.0, 1.0)])
def test_nuslerp_weight_endpoints_return_one_model(t_weights: tuple[float, float]) -> None:
    first, second = awkward(18), awkward(19)
    out = run("nuslerp", [first, second], NuslerpParams(), weights=list(t_weights))
    torch.testing.assert_close(out, first if t_weights[0] else second, **F64)


def test_nuslerp_bf16_stays_in_bf16() -> None:
    base = awkward(20, dtype=torch.bfloat16)
    first = awkward(21, like=base, dtype=torch.bfloat16)
    second = awkward(22, like=base, dtype=torch.bfloat16)
    out = run("nuslerp", [first, second], NuslerpParams(), weights=[0.4, 0.6], base=base)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_nuslerp([first, second], [0.4, 0.6], base),
                               rtol=0.05, atol=0.1)


# -- multislerp ------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[0.2, 0.5, 0.3], [1.0, 2.0, 4.0], [1.0, -0.3, 0.8],
                                     [0.6, 0.4], [1.0, 2.0, 3.0, 4.0]])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("normalize", [True, False])
def test_multislerp_matches_reference(weights: list[float], with_base: bool,
                                      normalize: bool) -> None:
    base = awkward(30)
    models = [awkward(31 + i, like=base) for i in range(len(weights))]
    params = MultislerpParams(normalize_weights=normalize)
    out = run("multislerp", models, params, weights=weights, base=base if with_base else None)
    expected = ref_multislerp(models, weights, base if with_base else None, normalize=normalize)
    torch.testing.assert_close(out, expected, **F64)


def test_multislerp_eps_is_used() -> None:
    models = [awkward(40, (3,)) * 1e-3, awkward(41, (3,)) * 1e-3]
    out = run("multislerp", models, MultislerpParams(eps=1e-3), weights=[1.0, 1.0])
    torch.testing.assert_close(out, ref_multislerp(models, [1.0, 1.0], None, eps=1e-3), **F64)


def test_multislerp_of_one_model_returns_it_even_with_a_base() -> None:
    base, model = awkward(42), awkward(43)
    assert torch.equal(run("multislerp", [model], MultislerpParams(), weights=[0.3], base=base),
                       model)


@pytest.mark.parametrize("with_base", [False, True])
def test_multislerp_two_antipodal_models_fall_back_to_linear(with_base: bool) -> None:
    base = awkward(44) if with_base else torch.zeros(6, 10, dtype=torch.float64)
    delta = awkward(45)
    models = [base + delta, base - delta]
    out = run("multislerp", models, MultislerpParams(), weights=[1.0, 1.0],
              base=base if with_base else None)
    torch.testing.assert_close(out, base, **F64)  # 0.5·δ + 0.5·(−δ) = 0, plus the base


def test_multislerp_three_cancelling_models_raise() -> None:
    a = awkward(46)
    with pytest.raises(RecipeError, match="cancel out"):
        run("multislerp", [a, -a, a.clone()], MultislerpParams(), weights=[1.0, 2.0, 1.0])


def test_multislerp_zero_weight_sum_raises_when_normalizing() -> None:
    a, b = awkward(47), awkward(48)
    with pytest.raises(RecipeError, match="normalize_weights: false"):
        run("multislerp", [a, b], MultislerpParams(), weights=[1.0, -1.0])


def test_multislerp_bf16_stays_in_bf16() -> None:
    models = [awkward(49 + i, dtype=torch.bfloat16) for i in range(3)]
    out = run("multislerp", models, MultislerpParams(), weights=[1.0, 1.0, 2.0])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_multislerp(models, [1.0, 1.0, 2.0], None),
                               rtol=0.05, atol=0.1)


# -- karcher ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_models", [2, 3, 5])
@pytest.mark.parametrize(("max_iter", "tol"), [(10, 1e-5), (1, 1e-5), (0, 1e-5), (50, 1e-12)])
def test_karcher_matches_reference(n_models: int, max_iter: int, tol: float) -> None:
    first = awkward(60)
    models = [first] + [awkward(61 + i, like=first) for i in range(n_models - 1)]
    out = run("karcher", models, KarcherParams(max_iter=max_iter, tol=tol))
    torch.testing.assert_close(out, ref_karcher(models, max_iter=max_iter, tol=tol), **F64)


def test_karcher_tol_applies_to_angles_and_to_the_step() -> None:
    """Directions closer than ``tol`` radians are skipped; a step shorter than ``tol`` stops.

    Here the third direction is 0.0087 rad from the starting mean: with tol = 0.002 it counts and
    the full step (3e-4) is below tol, so the start is the answer; were it skipped, the step from
    the other two (3e-3) would be taken.
    """
    def on_sphere(angle: float, tilt: float) -> torch.Tensor:
        return torch.tensor([math.cos(angle) * math.cos(tilt), math.sin(angle) * math.cos(tilt),
                             math.sin(tilt)], dtype=torch.float64)

    models = [2 * on_sphere(0.8, 0.0), 3 * on_sphere(-0.8, 0.0), on_sphere(0.0, 0.015)]
    for tol in (0.002, 0.02, 1e-9):
        out = run("karcher", models, KarcherParams(tol=tol))
        torch.testing.assert_close(out, ref_karcher(models, tol=tol), **F64)
    start = sum(x / x.norm() for x in models)
    expected = start / start.norm() * 2  # mean norm (2 + 3 + 1) / 3
    torch.testing.assert_close(run("karcher", models, KarcherParams(tol=0.002)), expected, **F64)


def test_karcher_of_two_models_is_the_geodesic_midpoint() -> None:
    a, b = awkward(70), awkward(71)
    ua, ub = a / a.norm(), b / b.norm()
    expected = (ua + ub) / (ua + ub).norm() * (a.norm() + b.norm()) / 2
    torch.testing.assert_close(run("karcher", [a, b], KarcherParams(max_iter=50, tol=1e-12)),
                               expected, **F64)


def test_karcher_direction_satisfies_the_first_order_condition() -> None:
    models = [awkward(72 + i, (40,)) for i in range(4)]
    out = run("karcher", models, KarcherParams(max_iter=200, tol=1e-14))
    m = out / out.norm()
    gradient = torch.zeros_like(m)
    for x in models:
        u = x / x.norm()
        theta = math.acos(float((m @ u).clamp(-1, 1)))
        gradient += theta / math.sin(theta) * (u - math.cos(theta) * m)
    assert float(gradient.norm()) < 1e-10
    assert float(out.norm()) == pytest.approx(sum(float(x.norm()) for x in models) / 4, rel=1e-12)


def test_karcher_leaves_zero_models_out_of_the_direction_but_not_the_scale() -> None:
    a, b = awkward(80), awkward(81)
    zero = torch.zeros_like(a)
    out = run("karcher", [a, zero, b], KarcherParams(max_iter=50, tol=1e-12))
    ua, ub = a / a.norm(), b / b.norm()
    expected = (ua + ub) / (ua + ub).norm() * (a.norm() + b.norm()) / 3
    torch.testing.assert_close(out, expected, **F64)


def test_karcher_of_only_zero_models_is_zero() -> None:
    zeros = [torch.zeros(3, 4), torch.full((3, 4), 1e-9)]
    out = run("karcher", zeros, KarcherParams())
    assert torch.equal(out, torch.zeros(3, 4))


def test_karcher_bf16_keeps_directions_in_bf16() -> None:
    models = [awkward(82 + i, dtype=torch.bfloat16) for i in range(3)]
    out = run("karcher", models, KarcherParams())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), ref_karcher(models), rtol=0.05, atol=0.1)


@st.composite
def tensors_1d(draw: st.DrawFn, n_models: int) -> list[torch.Tensor]:
    n = draw(st.integers(1, 16))
    rows = [draw(st.lists(finite, min_size=n, max_size=n)) for _ in range(n_models)]
    return [torch.tensor(row, dtype=torch.float64) for row in rows]


@PROPERTIES
@given(models=tensors_1d(1))
def test_karcher_of_one_model_returns_it(models: list[torch.Tensor]) -> None:
    assert torch.equal(run("karcher", models, KarcherParams()), models[0])


# -- every method on identical inputs ---------------------------------------------------------------


def _identical_cases(x: torch.Tensor, other_base: torch.Tensor) -> list[torch.Tensor]:
    return [
        run("slerp", [x.clone()], SlerpParams(t=0.37), base=x),
        run("nuslerp", [x, x.clone()], NuslerpParams(), weights=[0.3, 0.9]),
        run("nuslerp", [x, x.clone()], NuslerpParams(nuslerp_flatten=False), weights=[1.0, 1.0],
            base=other_base),
        run("nuslerp", [x, x.clone()], NuslerpParams(), weights=[1.0, 2.0], base=x.clone()),
        run("multislerp", [x, x.clone(), x.clone()], MultislerpParams(), weights=[0.2, 0.3, 0.5]),
        run("multislerp", [x, x.clone()], MultislerpParams(), weights=[1.0, 3.0], base=other_base),
        run("multislerp", [x, x.clone()], MultislerpParams(), weights=[1.0, 3.0], base=x.clone()),
        run("karcher", [x, x.clone(), x.clone()], KarcherParams()),
    ]


@PROPERTIES
@given(models=tensors_1d(2))
def test_every_method_returns_identical_inputs(models: list[torch.Tensor]) -> None:
    x, other_base = models
    if float(x.norm()) < 1e-3 or float((x - other_base).norm()) < 1e-3:
        return
    for case, out in enumerate(_identical_cases(x, other_base)):
        torch.testing.assert_close(out, x, rtol=1e-7, atol=1e-7 * float(x.abs().max()),
                                   msg=labelled(f"case {case}"))


def test_every_method_returns_identical_float32_inputs() -> None:
    x = awkward(90, dtype=torch.float32)
    for case, out in enumerate(_identical_cases(x, awkward(91, dtype=torch.float32))):
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, x, rtol=1e-5, atol=1e-5, msg=labelled(f"case {case}"))


# -- recipes ---------------------------------------------------------------------------------------


def depth(name: str, n_layers: int = 2) -> float:
    match = LAYER.match(name)
    return int(match.group(1)) / (n_layers - 1) if match else 0.0


def weights64(folder: Path) -> dict[str, torch.Tensor]:
    return {name: tensor.double() for name, tensor in load_weights(folder).items()}


def check_state(out: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *,
                dtype: torch.dtype = torch.float32, **tolerance: float) -> None:
    assert sorted(out) == sorted(expected)
    for name, ref in expected.items():
        assert out[name].dtype == dtype, name
        torch.testing.assert_close(out[name].double(), ref, msg=labelled(name),
                                   **(tolerance or F32))


def slerp_t(name: str) -> float:
    """The recipe's t: self_attn → gradient [0, 0.5, 1]; mlp → gradient [0.2, 0.9]; else 0.5."""
    t = depth(name)
    if "self_attn" in name:
        return float(np.interp(t, [0.0, 0.5, 1.0], [0.0, 0.5, 1.0]))
    if "mlp" in name:
        return float(np.interp(t, [0.0, 1.0], [0.2, 0.9]))
    return 0.5


SLERP_RECIPE = """merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {other}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 1]
    - filter: mlp
      value: [0.2, 0.9]
    - value: 0.5
"""


def test_slerp_recipe_with_gradient_and_filters(tiny_models: dict[str, Path],
                                                tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", SLERP_RECIPE.format(base=tiny_models["base"],
                                                                   other=tiny_models["math"]))
    fusekit.merge(recipe, tmp_path / "out")
    base, other = weights64(tiny_models["base"]), weights64(tiny_models["math"])
    expected = {n: ref_slerp(slerp_t(n), base[n], other[n]) for n in base}
    out = load_weights(tmp_path / "out")
    check_state(out, expected)
    q0, q1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(out[q0], base[q0].float())  # t = 0: the base, exactly
    assert torch.equal(out[q1], other[q1].float())  # t = 1: the other model, exactly


def test_slerp_recipe_on_bf16_models_rounds_once(bf16_models: dict[str, Path],
                                                 tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", SLERP_RECIPE.format(base=bf16_models["base"],
                                                                   other=bf16_models["code"]))
    fusekit.merge(recipe, tmp_path / "out")
    base, other = weights64(bf16_models["base"]), weights64(bf16_models["code"])
    out = load_weights(tmp_path / "out")
    eps = torch.finfo(torch.bfloat16).eps
    for name in base:
        ref = ref_slerp(slerp_t(name), base[name], other[name])
        assert out[name].dtype == torch.bfloat16
        error = (out[name].double() - ref).abs()
        assert torch.all(error <= eps * ref.abs() + 1e-6), name  # within one bf16 ulp


def test_nuslerp_recipe(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: nuslerp
base_model: {tiny_models["base"]}
models:
  - model: {tiny_models["math"]}
    parameters: {{weight: 0.4}}
  - model: {tiny_models["code"]}
    parameters: {{weight: [0.2, 1.8]}}
parameters:
  nuslerp_flatten: false
""")
    fusekit.merge(recipe, tmp_path / "out")
    base, math_, code = (weights64(tiny_models[n]) for n in ("base", "math", "code"))
    expected = {n: ref_nuslerp([math_[n], code[n]], [0.4, 0.2 + 1.6 * depth(n)], base[n],
                               flatten=False) for n in base}
    check_state(load_weights(tmp_path / "out"), expected)


def test_nuslerp_recipe_without_base(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: nuslerp
models:
  - model: {tiny_models["math"]}
    parameters: {{weight: 1.0}}
  - model: {tiny_models["code"]}
    parameters: {{weight: 3.0}}
parameters:
  nuslerp_row_wise: true
  nuslerp_flatten: false
""")
    fusekit.merge(recipe, tmp_path / "out")
    math_, code = (weights64(tiny_models[n]) for n in ("math", "code"))
    expected = {n: ref_nuslerp([math_[n], code[n]], [1.0, 3.0], None, flatten=False,
                               row_wise=True) for n in math_}
    check_state(load_weights(tmp_path / "out"), expected)


def test_multislerp_recipe(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: multislerp
base_model: {tiny_models["base"]}
models:
  - model: {tiny_models["math"]}
    parameters: {{weight: 0.7}}
  - model: {tiny_models["code"]}
    parameters: {{weight: 0.3}}
""")
    fusekit.merge(recipe, tmp_path / "out")
    base, math_, code = (weights64(tiny_models[n]) for n in ("base", "math", "code"))
    expected = {n: ref_multislerp([math_[n], code[n]], [0.7, 0.3], base[n]) for n in base}
    check_state(load_weights(tmp_path / "out"), expected)


def test_karcher_recipe_counts_the_base_as_a_model(tiny_models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: karcher
base_model: {tiny_models["base"]}
models:
  - model: {tiny_models["math"]}
  - model: {tiny_models["code"]}
parameters:
  max_iter: 20
  tol: 1e-7
""")
    fusekit.merge(recipe, tmp_path / "out")
    models = [weights64(tiny_models[n]) for n in ("math", "code", "base")]
    expected = {n: ref_karcher([m[n] for m in models], max_iter=20, tol=1e-7) for n in models[0]}
    check_state(load_weights(tmp_path / "out"), expected, rtol=1e-4, atol=1e-5)


# -- recipe errors ---------------------------------------------------------------------------------


def _recipe(method: str, models: list[str], *, base: str | None = None, model_params: str = "",
            params: str = "") -> str:
    text = f"merge_method: {method}\n" + (f"base_model: {base}\n" if base else "") + "models:\n"
    for model in models:
        text += f"  - model: {model}\n" + (f"    parameters: {model_params}\n" if model_params else "")
    return text + (f"parameters:\n{params}" if params else "")


@pytest.mark.parametrize(("text", "message"), [
    (_recipe("slerp", ["a", "b"], params="  t: 0.5\n"), "slerp needs a base model"),
    (_recipe("slerp", ["a", "b", "c"], base="a", params="  t: 0.5\n"),
     "slerp takes exactly 1 model besides the base, got 2"),
    (_recipe("slerp", ["a"], base="a", params="  t: 0.5\n"),
     "slerp needs at least 1 model besides the base, got 0"),
    (_recipe("nuslerp", ["a", "b", "c"], model_params="{weight: 1}"),
     "nuslerp takes exactly 2 models, got 3"),
    (_recipe("nuslerp", ["b"], base="a", model_params="{weight: 1}"),
     "nuslerp needs at least 2 models besides the base, got 1"),
    (_recipe("multislerp", ["a"], base="a", model_params="{weight: 1}"),
     "multislerp needs at least 1 model besides the base, got 0"),
    (_recipe("karcher", ["a", "b"], model_params="{weight: 1}"),
     "karcher does not take 'weight'"),
    (_recipe("nuslerp", ["a", "b"], model_params="{weight: 1}", params="  nuslerp_flaten: false\n"),
     "did you mean 'nuslerp_flatten'"),
    (_recipe("karcher", ["a", "b"], params="  max_iter: 2.5\n"), "max_iter"),
    (_recipe("slerp", ["b"], base="a", params="  t: high\n"), "t"),
])
def test_bad_recipes_fail_when_loading(text: str, message: str) -> None:
    with pytest.raises(RecipeError, match=re.escape(message)):
        parse_merge_recipe(text, strict=True)  # strict: settings with no effect are errors


def test_missing_t_fails_before_any_tensor_is_read(tiny_models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", _recipe(
        "slerp", [str(tiny_models["math"])], base=str(tiny_models["base"])))
    with pytest.raises(FusekitError, match="slerp needs parameter 't'"):
        fusekit.plan_merge(recipe)
    assert not (tmp_path / "out").exists()
