"""Expert initialisation for MoE upcycling: a copied dense tensor with Gaussian noise, rescaled.

``out = (θ + σ·ε) · s`` with ``ε ~ N(0, 1)`` drawn from the run's seeded generator for this output
tensor, ``σ`` the expert's ``noise_scale`` and ``s`` its scale (``residual_scale`` on down
projections). Noise breaks the symmetry between experts copied from one model (Komatsuzaki et al.,
"Sparse Upcycling", 2022). Without noise, upcycling uses ``passthrough``, which is elementwise.
"""

from __future__ import annotations

import torch
from pydantic import Field

from fusekit.ops.registry import MergeInputs, Params, register


class ExpertNoiseModelParams(Params):
    noise_scale: float = Field(ge=0, description="standard deviation of the added noise")
    scale: float | None = Field(None, description="multiply the result by this factor")


@register("expert_noise", model_params=ExpertNoiseModelParams, min_models=1, max_models=1,
          summary="copies one expert tensor with seeded Gaussian noise (MoE upcycling)",
          stochastic=True, scratch=lambda n, size: 2 * max(size, 4))
def expert_noise(inputs: MergeInputs) -> torch.Tensor:
    (tensor,) = inputs.tensors  # (*shape)
    params: ExpertNoiseModelParams = inputs.model_params[0]  # type: ignore[assignment]
    noise = torch.randn(tensor.shape, generator=inputs.generator(0), dtype=torch.float32)
    result = tensor + (noise * params.noise_scale).to(device=tensor.device, dtype=tensor.dtype)
    return result if params.scale is None else result * params.scale
