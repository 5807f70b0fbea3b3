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
Filter-wise, all arithmetic runs in the compute dtype in mergekit's order, so results agree bit
for bit; the whole-tensor angle is summed row by row in float64 instead, so that large tensors can
be merged in row blocks (the ratio then differs from mergekit's in its last bits at most).
"""

from __future__ import annotations

import math
from typing import cast

import torch
from pydantic import Field

from fusekit.ops.registry import MergeInputs, Params, TensorContext, register, whole_tensor
from fusekit.ops.rows import PairSums

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


class ModelStockPasses:
    """Model Stock as a :class:`~fusekit.ops.registry.BlockwiseMerge`.

    Over the whole tensor, one pass sums ``⟨τ_i, τ_j⟩`` and ``‖τ_i‖²`` row by row (see
    :mod:`fusekit.ops.rows`) for the one angle; ``filter_wise`` angles belong to single rows, so
    each block is merged on its own with no pass.
    """

    def __init__(self, context: TensorContext) -> None:
        self.filter_wise = cast(ModelStockParams, context.params).filter_wise
        self.count = len(context.model_params)
        self.passes = 0 if self.filter_wise else 1
        self.pairs = [(i, j) for i in range(self.count) for j in range(i, self.count)]
        self._sums = PairSums(self.pairs)
        self._ratio: float | None = None

    def observe(self, stage: int, block: MergeInputs) -> None:
        assert block.base is not None
        self._sums.add([tensor - block.base for tensor in block.tensors])

    def end_pass(self, stage: int) -> None:
        total = self._sums.totals()
        cosines = []
        for i, j in self.pairs:
            if i != j:
                norms = math.sqrt(total[i, i]) * math.sqrt(total[j, j])
                cosines.append(min(1.0, max(-1.0, total[i, j] / max(norms, _NORM_FLOOR))))
        cosine = sum(cosines) / len(cosines)
        denominator = 1 + (self.count - 1) * cosine
        self._ratio = 0.0 if abs(denominator) < _SINGULAR else self.count * cosine / denominator

    def apply(self, block: MergeInputs) -> torch.Tensor:
        assert block.base is not None
        base = as_vectors(block.base, filter_wise=self.filter_wise)  # (*rows, last_dim) or (numel,)
        models = [as_vectors(t, filter_wise=self.filter_wise) for t in block.tensors]
        if self._ratio is None:  # filter-wise: one angle per row of this block
            cosine = mean_pairwise_cosine([m - base for m in models]).unsqueeze(-1)  # (*rows, 1)
            ratio = interpolation_ratio(cosine, len(models))
        else:
            ratio = torch.tensor(self._ratio, dtype=base.dtype, device=base.device)
        total = 0 + models[0]  # a running sum from 0, as Python's sum() does (so -0.0 becomes 0.0)
        for model in models[1:]:
            total = total + model
        average = total / len(models)
        return (ratio * average + (1 - ratio) * base).reshape(block.base.shape)


_model_stock = whole_tensor(ModelStockPasses)


@register("model_stock", method_params=ModelStockParams, base="required", min_models=2,
          summary="moves the base towards the fine-tunes' average by a ratio set by the angle "
                  "between their task vectors (Model Stock)", blockwise=ModelStockPasses)
def model_stock(inputs: MergeInputs) -> torch.Tensor:
    """``t · mean_i θ_i + (1 − t) · θ_0`` with ``t`` from the mean pairwise cosine of task vectors."""
    return _model_stock(inputs)
