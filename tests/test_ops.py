"""Merge kernels called directly, checked against float64 references written from the formulas.

The references here never call fusekit: they restate mergekit's definitions.

- linear: ``Σ w_i θ_i``, divided by ``Σ w_i`` when ``normalize`` (default true).
- task_arithmetic: ``base + λ Σ w_i (θ_i − base)``, divided by ``Σ w_i`` when ``normalize``
  (default false; a divisor with ``|Σ w| < 1e-8`` counts as 1).
- passthrough: the one tensor, times ``scale`` when given.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusekit.errors import FusekitError
from fusekit.ops import MergeInputs, get_method, method_names

F32_EPS = torch.finfo(torch.float32).eps


# -- helpers ----------------------------------------------------------------------------------------


def run_kernel(name: str, tensors: list[torch.Tensor], model_params: list[dict], params: dict | None = None,
               base: torch.Tensor | None = None) -> torch.Tensor:
    method = get_method(name)
    inputs = MergeInputs(
        tensors=tensors,
        model_params=[method.model_params.model_validate(p) for p in model_params],
        params=method.method_params.model_validate(params or {}),
        base=base,
    )
    return method.kernel(inputs)


def ref_linear(tensors: list[torch.Tensor], weights: list[float], normalize: bool = True) -> torch.Tensor:
    total = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights, strict=True):
        total += float(weight) * tensor.double()
    if normalize:
        total /= math.fsum(weights)
    return total


def ref_task_arithmetic(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *,
                        lambda_: float = 1.0, normalize: bool = False) -> torch.Tensor:
    base64 = base.double()
    mixed = torch.zeros(base.shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights, strict=True):
        mixed += float(weight) * (tensor.double() - base64)
    if normalize:
        divisor = math.fsum(weights)
        mixed /= divisor if abs(divisor) >= 1e-8 else 1.0
    return base64 + lambda_ * mixed


def f32_bound(tensors: list[torch.Tensor], weights: list[float], divisor: float = 1.0,
              factor: float = 16.0) -> torch.Tensor:
    """Elementwise rounding bound for a float32 weighted sum: factor·eps·Σ|w_i θ_i| / |divisor|."""
    scale = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights, strict=True):
        scale += abs(float(weight)) * tensor.double().abs()
    return factor * F32_EPS * scale / abs(divisor) + 1e-30


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    error = (actual.double() - expected).abs()
    worst = float((error - bound).max()) if error.numel() else 0.0
    assert torch.all(error <= bound), (f"max excess over the bound {worst:.3e}; "
                                       f"max error {float(error.max()):.3e}")


def sample_tensors(seed: int, count: int, shape: tuple[int, ...] = (7, 5)) -> list[torch.Tensor]:
    """Random tensors with sign conflicts between models, exact zeros and a few large outliers."""
    gen = torch.Generator().manual_seed(seed)
    tensors = []
    for _ in range(count):
        tensor = torch.randn(shape, generator=gen)
        tensor[0, :2] = 0.0
        tensor[1, 1] = 1e4 * (1 if torch.rand((), generator=gen) > 0.5 else -1)
        tensors.append(tensor)
    # sign conflict: the same element with opposite signs across models
    tensors[0][2, 2] = 3.0
    tensors[-1][2, 2] = -3.0
    return tensors


# -- registry and parameter models ------------------------------------------------------------------


def test_registered_methods_and_parameter_defaults() -> None:
    assert {"linear", "task_arithmetic", "passthrough"} <= set(method_names())
    linear = get_method("linear")
    assert linear.method_params.model_validate({}).normalize is True
    assert linear.base != "required"
    task = get_method("task_arithmetic")
    params = task.method_params.model_validate({})
    assert params.normalize is False
    assert params.lambda_ == 1.0
    assert task.method_params.model_validate({"lambda": 0.25}).lambda_ == 0.25
    assert task.base == "required"
    passthrough = get_method("passthrough")
    assert passthrough.max_models == 1
    assert passthrough.model_params.model_validate({}).scale is None


def test_parameter_models_reject_unknown_names_and_missing_weights() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        get_method("linear").model_params.model_validate({"weight": 1.0, "wieght": 2.0})
    with pytest.raises(ValidationError):
        get_method("linear").model_params.model_validate({})
    with pytest.raises(ValidationError):
        get_method("task_arithmetic").method_params.model_validate({"lambd": 1.0})


# -- linear -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.2, 0.3, 0.5], [3.0, -1.0, 0.5], [1e-3, 10.0, 2.0]])
def test_linear_normalized_matches_reference(weights: list[float]) -> None:
    tensors = sample_tensors(1, 3)
    result = run_kernel("linear", tensors, [{"weight": w} for w in weights])
    expected = ref_linear(tensors, weights)
    assert result.dtype == torch.float32
    assert result.shape == tensors[0].shape
    assert_within(result, expected, f32_bound(tensors, weights, math.fsum(weights)))


@pytest.mark.parametrize("weights", [[0.5, 0.5], [2.0, -0.5], [0.0, 1.0], [-1.0, 1.0]])
def test_linear_unnormalized_is_the_plain_weighted_sum(weights: list[float]) -> None:
    tensors = sample_tensors(2, 2)
    result = run_kernel("linear", tensors, [{"weight": w} for w in weights], {"normalize": False})
    assert_within(result, ref_linear(tensors, weights, normalize=False), f32_bound(tensors, weights))


def test_linear_normalize_false_with_unit_sum_equals_normalized() -> None:
    tensors = sample_tensors(3, 3)
    weights = [0.25, 0.25, 0.5]  # exact binary fractions: both runs do the same float32 arithmetic
    params = [{"weight": w} for w in weights]
    plain = run_kernel("linear", tensors, params, {"normalize": False})
    normalized = run_kernel("linear", tensors, params, {"normalize": True})
    torch.testing.assert_close(plain, normalized, rtol=0, atol=0)
    assert_within(plain, ref_linear(tensors, weights), f32_bound(tensors, weights))


def test_linear_normalize_false_with_weights_summing_to_two_doubles_the_average() -> None:
    tensors = sample_tensors(4, 2)
    weights = [0.75, 1.25]
    params = [{"weight": w} for w in weights]
    plain = run_kernel("linear", tensors, params, {"normalize": False})
    normalized = run_kernel("linear", tensors, params)
    # dividing by 2 is exact in binary floating point
    torch.testing.assert_close(plain, 2 * normalized, rtol=0, atol=0)
    assert_within(plain, 2 * ref_linear(tensors, weights), f32_bound(tensors, weights))


@pytest.mark.parametrize("weights", [[1.0, -1.0], [0.0, 0.0], [2.0, -1.5, -0.5]])
def test_linear_weights_summing_to_zero_is_a_clean_error(weights: list[float]) -> None:
    tensors = sample_tensors(5, len(weights))
    with pytest.raises(FusekitError, match="sum to 0"):
        run_kernel("linear", tensors, [{"weight": w} for w in weights])


def test_linear_zero_sum_without_normalize_is_allowed() -> None:
    tensors = sample_tensors(6, 2)
    result = run_kernel("linear", tensors, [{"weight": 1.0}, {"weight": -1.0}], {"normalize": False})
    assert_within(result, ref_linear(tensors, [1.0, -1.0], normalize=False),
                  f32_bound(tensors, [1.0, -1.0]))


def test_linear_single_model_returns_it() -> None:
    (tensor,) = sample_tensors(7, 1)
    result = run_kernel("linear", [tensor], [{"weight": 0.3}])
    assert_within(result, tensor.double(), f32_bound([tensor], [1.0], factor=4))


def test_linear_float64_inputs_accumulate_in_float64() -> None:
    tensors = [t.double() for t in sample_tensors(8, 3)]
    weights = [0.1, 0.7, 0.2]
    result = run_kernel("linear", tensors, [{"weight": w} for w in weights])
    assert result.dtype == torch.float64
    torch.testing.assert_close(result, ref_linear(tensors, weights), rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_linear_half_precision_returns_input_dtype_rounded_from_reference(dtype: torch.dtype) -> None:
    tensors = [(t / 1e4 if dtype == torch.float16 else t).to(dtype) for t in sample_tensors(9, 3)]
    weights = [0.3, 0.3, 0.4]
    result = run_kernel("linear", tensors, [{"weight": w} for w in weights])
    assert result.dtype == dtype
    expected = ref_linear(tensors, weights)
    # float32 accumulation then one rounding: within one unit in the last place of the half format
    ulp = torch.finfo(dtype).eps * expected.abs().clamp_min(torch.finfo(dtype).tiny)
    assert_within(result, expected, ulp + 1e-30)


def test_linear_accumulates_half_precision_inputs_in_float32() -> None:
    # In bfloat16, 256 + 1 rounds back to 256 (spacing 2), so a bfloat16 running sum would give 256;
    # a float32 accumulator gives 258, which bfloat16 represents exactly.
    tensors = [torch.full((4,), v, dtype=torch.bfloat16) for v in (256.0, 1.0, 1.0)]
    result = run_kernel("linear", tensors, [{"weight": 1.0}] * 3, {"normalize": False})
    assert result.dtype == torch.bfloat16
    assert torch.equal(result, torch.full((4,), 258.0, dtype=torch.bfloat16))


def test_linear_handles_empty_and_zero_dim_tensors() -> None:
    empty = [torch.zeros((0, 3)), torch.zeros((0, 3))]
    assert run_kernel("linear", empty, [{"weight": 1.0}, {"weight": 2.0}]).shape == (0, 3)
    scalars = [torch.tensor(2.0), torch.tensor(-4.0)]
    result = run_kernel("linear", scalars, [{"weight": 3.0}, {"weight": 1.0}])
    assert result.shape == ()
    assert float(result) == pytest.approx((3 * 2.0 + 1 * -4.0) / 4.0, abs=1e-7)


# -- task arithmetic --------------------------------------------------------------------------------


@pytest.mark.parametrize(("weights", "lambda_", "normalize"), [
    ([1.0, 1.0], 1.0, False),
    ([0.7, 0.3], 0.5, False),
    ([0.7, 0.3], 0.5, True),
    ([2.0, -0.5], 1.3, True),
    ([1.5, -0.4, 0.9], 1.0, False),
    ([1.0, -1.0], 1.0, True),  # |Σw| < 1e-8: the divisor counts as 1
    ([0.5, -0.5 + 1e-9], 2.0, True),  # tiny but nonzero sum also counts as 1
])
def test_task_arithmetic_matches_reference(weights: list[float], lambda_: float, normalize: bool) -> None:
    base, *tensors = sample_tensors(10, len(weights) + 1)
    result = run_kernel("task_arithmetic", tensors, [{"weight": w} for w in weights],
                        {"lambda": lambda_, "normalize": normalize}, base=base)
    expected = ref_task_arithmetic(base, tensors, weights, lambda_=lambda_, normalize=normalize)
    assert result.dtype == torch.float32
    divisor = math.fsum(weights) if normalize and abs(math.fsum(weights)) >= 1e-8 else 1.0
    # float32 rounding bound: a few eps of |base| + |λ/divisor| Σ |w_i| (|θ_i| + |base|)
    spread = sum(abs(w) * (t.double().abs() + base.double().abs())
                 for w, t in zip(weights, tensors, strict=True))
    bound = 16 * F32_EPS * (base.double().abs() + abs(lambda_ / divisor) * spread)
    assert_within(result, expected, bound)


def test_task_arithmetic_lambda_default_is_one_and_normalize_default_is_off() -> None:
    base, a, b = sample_tensors(11, 3)
    weights = [0.6, 0.9]  # sum 1.5: normalizing would change the result
    default = run_kernel("task_arithmetic", [a, b], [{"weight": w} for w in weights], base=base)
    explicit = run_kernel("task_arithmetic", [a, b], [{"weight": w} for w in weights],
                          {"lambda": 1.0, "normalize": False}, base=base)
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)
    expected = ref_task_arithmetic(base, [a, b], weights)
    torch.testing.assert_close(default.double(), expected, rtol=1e-5, atol=1e-2)  # outliers are 1e4
    normalized = ref_task_arithmetic(base, [a, b], weights, normalize=True)
    assert not torch.allclose(default.double(), normalized, rtol=1e-3, atol=1e-3)


def test_task_arithmetic_computes_in_the_input_dtype() -> None:
    base, a = sample_tensors(12, 2)
    for dtype in (torch.float64, torch.bfloat16):
        result = run_kernel("task_arithmetic", [a.to(dtype)], [{"weight": 0.5}], base=base.to(dtype))
        assert result.dtype == dtype
    result = run_kernel("task_arithmetic", [a.double()], [{"weight": 0.5}], {"lambda": 0.8},
                        base=base.double())
    torch.testing.assert_close(result, ref_task_arithmetic(base.double(), [a.double()], [0.5], lambda_=0.8),
                               rtol=1e-12, atol=1e-9)


def test_task_arithmetic_zero_weight_returns_base() -> None:
    base, a = sample_tensors(13, 2)
    result = run_kernel("task_arithmetic", [a], [{"weight": 0.0}], base=base)
    assert torch.equal(result, base)


# -- passthrough ------------------------------------------------------------------------------------


def test_passthrough_returns_the_tensor_unchanged() -> None:
    (tensor,) = sample_tensors(14, 1)
    result = run_kernel("passthrough", [tensor], [{}])
    assert torch.equal(result, tensor)
    assert result.dtype == tensor.dtype


@pytest.mark.parametrize("scale", [0.5, -2.0, 0.0, 3.0])
def test_passthrough_scale_multiplies(scale: float) -> None:
    (tensor,) = sample_tensors(15, 1)
    result = run_kernel("passthrough", [tensor], [{"scale": scale}])
    expected = tensor.double() * scale
    assert_within(result, expected, F32_EPS * expected.abs() + 1e-30)


# -- properties -------------------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=60, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])
shapes = st.sampled_from([(1,), (5,), (3, 4), (2, 3, 2)])
positive_weights = st.floats(min_value=1e-3, max_value=1e3, allow_nan=False, allow_infinity=False)
any_weights = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


def random_tensor(seed: int, shape: tuple[int, ...], scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shape=shapes,
       weights=st.lists(positive_weights, min_size=1, max_size=5),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_linear_of_identical_tensors_returns_them(seed: int, shape: tuple[int, ...], weights: list[float],
                                                  scale: float) -> None:
    tensor = random_tensor(seed, shape, scale)
    result = run_kernel("linear", [tensor.clone() for _ in weights], [{"weight": w} for w in weights])
    bound = 4 * (len(weights) + 1) * F32_EPS * tensor.double().abs() + 1e-30
    assert_within(result, tensor.double(), bound)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shape=shapes,
       weights=st.lists(any_weights, min_size=1, max_size=4),
       lambda_=any_weights, normalize=st.booleans(), dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_task_arithmetic_with_every_model_equal_to_base_returns_base_exactly(
        seed: int, shape: tuple[int, ...], weights: list[float], lambda_: float, normalize: bool,
        dtype: torch.dtype) -> None:
    base = random_tensor(seed, shape).to(dtype)
    result = run_kernel("task_arithmetic", [base.clone() for _ in weights], [{"weight": w} for w in weights],
                        {"lambda": lambda_, "normalize": normalize}, base=base)
    assert result.dtype == dtype
    assert torch.equal(result, base)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shape=shapes, normalize=st.booleans(),
       scale=st.sampled_from([1e-3, 1.0, 1e3]))
def test_task_arithmetic_single_model_unit_weight_returns_that_model(
        seed: int, shape: tuple[int, ...], normalize: bool, scale: float) -> None:
    base = random_tensor(seed, shape, scale)
    model = random_tensor(seed + 1, shape, scale)
    result = run_kernel("task_arithmetic", [model], [{"weight": 1.0}],
                        {"lambda": 1.0, "normalize": normalize}, base=base)
    # base + (model − base): two float32 roundings of magnitude at most |base| + |model|
    bound = 2 * F32_EPS * (base.double().abs() + model.double().abs()) + 1e-30
    assert_within(result, model.double(), bound)


@PROPERTY_SETTINGS
@given(seed=st.integers(0, 2**31 - 1), shape=shapes,
       weights=st.lists(positive_weights, min_size=2, max_size=5), data=st.data(),
       normalize=st.booleans())
def test_linear_is_invariant_to_permuting_models(seed: int, shape: tuple[int, ...], weights: list[float],
                                                 data: st.DataObject, normalize: bool) -> None:
    tensors = [random_tensor(seed + i, shape) for i in range(len(weights))]
    order = data.draw(st.permutations(range(len(weights))))
    params = {"normalize": normalize}
    result = run_kernel("linear", tensors, [{"weight": w} for w in weights], params)
    permuted = run_kernel("linear", [tensors[i] for i in order], [{"weight": weights[i]} for i in order],
                          params)
    divisor = math.fsum(weights) if normalize else 1.0
    bound = f32_bound(tensors, weights, divisor, factor=4 * (len(weights) + 1))
    assert_within(permuted, result.double(), bound)
    assert_within(result, ref_linear(tensors, weights, normalize), bound)
