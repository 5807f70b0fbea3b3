"""NearSwap: take the model's value where it is close to the base, keep the base where it is far.

From the QuartetAnemoi-70B-t0.0001 model card (alchemonaut, Hugging Face, 2024), as in
mergekit 0.1.5. With base ``a``, model ``b`` and threshold ``t``::

    w      = clamp(t / max(|a − b|, 1e-6), 0, 1)
    merged = w · b + (1 − w) · a

Elements that differ by at most ``t`` become the model's; larger differences pull back towards
the base in proportion ``t / |a − b|``. A negative ``t`` returns the base. The arithmetic runs in
the compute dtype in mergekit's order: torch evaluates ``t / d`` as ``reciprocal(d) · t``, so
this kernel does the same and agrees with mergekit bit for bit.
"""

from __future__ import annotations

from typing import cast

import torch
from pydantic import Field

from fusekit.ops.registry import MergeInputs, Params, register

_DISTANCE_FLOOR = 1e-6


class NearSwapParams(Params):
    t: float = Field(description="distance below which the model's value is taken outright")


@register("nearswap", method_params=NearSwapParams, base="required", min_models=1, max_models=1,
          summary="takes the model's values where they are within t of the base, and blends "
                  "towards the base as t / |difference| elsewhere (NearSwap)", elementwise=True)
def nearswap(inputs: MergeInputs) -> torch.Tensor:
    """``w · model + (1 − w) · base`` with ``w = clamp(t / max(|base − model|, 1e-6), 0, 1)``."""
    assert inputs.base is not None
    base, model = inputs.base, inputs.tensors[0]
    t = cast(NearSwapParams, inputs.params).t
    distance = (base - model).abs().clamp(min=_DISTANCE_FLOOR)
    weight = (distance.reciprocal() * t).clamp(min=0, max=1)
    return weight * model + (1 - weight) * base
