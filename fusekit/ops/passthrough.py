"""Copy one model's tensor unchanged (optionally scaled): the building block of frankenmerges."""

from __future__ import annotations

import torch
from pydantic import Field

from fusekit.ops.registry import MergeInputs, Params, register


class PassthroughModelParams(Params):
    scale: float | None = Field(None, description="multiply the tensor by this factor")


@register("passthrough", model_params=PassthroughModelParams, min_models=1, max_models=1,
          summary="copies one model's tensors (layer stacking with slices)", elementwise=True,
          scratch=lambda n, size: size)
def passthrough(inputs: MergeInputs) -> torch.Tensor:
    (tensor,) = inputs.tensors
    scale = inputs.model_params[0].scale  # type: ignore[attr-defined]
    return tensor if scale is None else tensor * scale
