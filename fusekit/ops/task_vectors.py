"""Task-vector merging: add weighted differences from a base model.

Ilharco et al., "Editing Models with Task Arithmetic" (2023): with task vectors
``τ_i = θ_i − θ_base``, ``merged = θ_base + λ · Σ_i w_i τ_i`` (÷ ``Σ_i w_i`` when ``normalize``).
"""

from __future__ import annotations

import torch
from pydantic import Field

from fusekit.ops.registry import MergeInputs, Params, register

_TINY_WEIGHT_SUM = 1e-8


def weight_column(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Weights shaped ``(n_models, 1, ..., 1)`` to broadcast against a ``(n_models, *shape)`` stack."""
    column = torch.tensor(weights, dtype=like.dtype, device=like.device)
    return column.view(-1, *([1] * (like.dim() - 1)))


class TaskArithmeticModelParams(Params):
    weight: float = Field(description="scale of this model's task vector")


class TaskArithmeticParams(Params):
    normalize: bool = Field(False, description="divide the summed task vectors by Σ weights")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    int8_mask: bool = Field(False, description="accepted for mergekit compatibility; no effect")


def combine_task_vectors(base: torch.Tensor, tensors: list[torch.Tensor], weights: list[float], *,
                         normalize: bool, lambda_: float) -> torch.Tensor:
    """``base + λ · Σ w_i (θ_i − base)`` with optional weight normalisation."""
    deltas = torch.stack([t - base for t in tensors])  # (n_models, *shape)
    weight = weight_column(weights, deltas)
    mixed = (deltas * weight).sum(dim=0)
    if normalize:
        divisor = weight.sum(dim=0)
        divisor[divisor.abs() < _TINY_WEIGHT_SUM] = 1
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


@register("task_arithmetic", model_params=TaskArithmeticModelParams,
          method_params=TaskArithmeticParams, base="required", min_models=1,
          summary="adds the weighted task vectors (model − base) to the base", elementwise=True,
          scratch=lambda n, size: (2 * n + 2) * size)  # deltas, weighted deltas, sum, result
def task_arithmetic(inputs: MergeInputs) -> torch.Tensor:
    assert inputs.base is not None
    params = inputs.params
    return combine_task_vectors(
        inputs.base, list(inputs.tensors),
        [p.weight for p in inputs.model_params],  # type: ignore[attr-defined]
        normalize=params.normalize, lambda_=params.lambda_,  # type: ignore[attr-defined]
    )
