"""Weighted averaging of whole models (model soups).

Wortsman et al., "Model soups" (2022): ``merged = Σ_i w_i θ_i``, divided by ``Σ_i w_i`` when
``normalize`` is on (the default), so weights need not sum to one.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fusekit.errors import RecipeError
from fusekit.ops.registry import MergeInputs, Params, register


class LinearModelParams(Params):
    weight: float = Field(description="this model's weight")


class LinearParams(Params):
    normalize: bool = Field(True, description="divide by the sum of the weights")


@register("linear", model_params=LinearModelParams, method_params=LinearParams,
          summary="weighted average of the models' weights (model soup)", elementwise=True,
          scratch=lambda n, size: 8)  # a float32 product and the float32 accumulator
def linear(inputs: MergeInputs) -> torch.Tensor:
    """``Σ w_i θ_i`` (÷ ``Σ w_i`` when normalize).

    Accumulates in float32 (float64 for float64 inputs) in input order, whatever the compute
    dtype, then casts back: half-precision merges lose nothing to the running sum.
    """
    first = inputs.tensors[0]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    weights = torch.tensor([p.weight for p in inputs.model_params],  # type: ignore[attr-defined]
                           dtype=acc_dtype, device=first.device)
    # 0 + x·w == x·w exactly, so starting from the first product skips a zero-filled pass.
    merged = first.to(acc_dtype) * weights[0]
    for tensor, weight in zip(inputs.tensors[1:], weights[1:], strict=True):
        merged.addcmul_(tensor, weight)
    if inputs.params.normalize:  # type: ignore[attr-defined]
        total = weights.sum()
        if float(total) == 0.0:
            raise RecipeError("linear: the weights sum to 0, so they cannot be normalized; "
                              "change a weight or set normalize: false")
        merged /= total
    return merged.to(first.dtype)
