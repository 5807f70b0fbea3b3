"""Model Stock: move from the base towards the average of the fine-tunes by an angle-derived ratio.

Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models" (ECCV 2024,
arXiv:2403.19522). With task vectors ``τ_i = θ_i − θ_0`` of ``N ≥ 2`` fine-tunes of the base
``θ_0``, let ``cos θ`` be the mean over pairs ``i < j`` of ``⟨τ_i, τ_j⟩ / (‖τ_i‖ ‖τ_j‖)``. Then::

    t       = N cos θ / (1 + (N − 1) cos θ)
    merged  = t · mean_i θ_i + (1 − t) · θ_0

As in mergekit 0.1.5: the angle is taken over the whole flattened tensor, or with
``filter_wise: true`` per vector along the last axis (one per output row of a weight matrix; a
1-D tensor is one vector). The norm product is floored at 1e-6 and each cosine clamped to [-1, 1];
where ``|1 + (N − 1) cos θ| < 1e-6`` the ratio has no finite value and the base is kept (t = 0).
All arithmetic runs in the compute dtype, in mergekit's order, so results agree bit for bit.
"""

from __future__ import annotations

from typing import cast

import torch
from pydantic import Field

from fusekit.ops.registry import MergeInputs, Params, register

_NORM_FLOOR = 1e-6
_SINGULAR = 1e-6


class ModelStockParams(Params):
    filter_wise: bool = Field(False, description="one angle per row (last axis) instead of one "
                                                 "per tensor")


def as_vectors(tensor: torch.Tensor, *, filter_wise: bool) -> torch.Tensor:
    """The tensor as the vectors whose angles are measured: ``(rows, last_dim)`` views or flat."""
    if not filter_wise:
        return tensor.reshape(-1)  # (numel,)
    return tensor.unsqueeze(0) if tensor.dim() == 1 else tensor  # (*rows, last_dim)


def mean_pairwise_cosine(offsets: list[torch.Tensor]) -> torch.Tensor:
    """Mean cosine similarity over all pairs of offsets, along the last axis: ``(*rows,)``."""
    cosines = []
    for i, first in enumerate(offsets):
        for second in offsets[i + 1:]:
            norms = torch.linalg.vector_norm(first, dim=-1) * torch.linalg.vector_norm(second, dim=-1)
            dot = (first * second).sum(dim=-1)
            cosines.append((dot / norms.clamp(min=_NORM_FLOOR)).clamp(-1, 1))
    return torch.stack(cosines).mean(dim=0)  # (*rows,)


def interpolation_ratio(cosine: torch.Tensor, count: int) -> torch.Tensor:
    """``t = N cos / (1 + (N − 1) cos)``, 0 where the denominator is (nearly) zero."""
    denominator = 1 + (count - 1) * cosine
    singular = denominator.abs() < _SINGULAR
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    return torch.where(singular, torch.zeros_like(cosine), (count * cosine) / safe)


@register("model_stock", method_params=ModelStockParams, base="required", min_models=2,
          summary="moves the base towards the fine-tunes' average by a ratio set by the angle "
                  "between their task vectors (Model Stock)")
def model_stock(inputs: MergeInputs) -> torch.Tensor:
    """``t · mean_i θ_i + (1 − t) · θ_0`` with ``t`` from the mean pairwise cosine of task vectors."""
    assert inputs.base is not None
    filter_wise = cast(ModelStockParams, inputs.params).filter_wise
    base = as_vectors(inputs.base, filter_wise=filter_wise)  # (*rows, last_dim) or (numel,)
    models = [as_vectors(t, filter_wise=filter_wise) for t in inputs.tensors]
    cosine = mean_pairwise_cosine([m - base for m in models]).unsqueeze(-1)  # (*rows, 1) or (1,)
    ratio = interpolation_ratio(cosine, len(models))
    total = 0 + models[0]  # a running sum from 0, as Python's sum() does (so -0.0 becomes 0.0)
    for model in models[1:]:
        total = total + model
    average = total / len(models)
    return (ratio * average + (1 - ratio) * base).reshape(inputs.base.shape)
