"""Arcee Fusion: keep only the model's changes whose importance is an upper outlier.

Arcee AI's method (https://arcee.ai, shipped in mergekit), as in mergekit 0.1.5. With base ``b``
and model ``m``, softmax taken along the last axis (one distribution per row; a 1-D tensor is one
row) and ``ε = 1e-8``::

    p, q        = softmax(m) + ε, softmax(b) + ε
    importance  = |m − b| · Σ_last p · log(p / q)           # element change × row's KL(p ‖ q)
    threshold   = Q2 + 1.5 · (Q3 − Q1)                      # quartiles of the importance
    merged      = b + (m − b) · [importance ≥ threshold]

Quartiles are order statistics of the sorted importance at index ``⌊k (n − 1) / 4⌋``, ``k = 1,
2, 3``. Tensors with more than 10⁶ elements have their quartiles estimated from 10⁶ elements drawn
with replacement (the method's only randomness), here from ``inputs.generator(0)`` on the CPU.

The mask is float32, as in mergekit, so half-precision inputs give a float32 result.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fusekit.ops.registry import MergeInputs, at_least_float32, register

_PROBABILITY_FLOOR = 1e-8
_QUANTILE_SAMPLE = 1_000_000
_IQR_FACTOR = 1.5


def importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|m − b|`` scaled by the KL divergence of the rows' softmaxes: same shape as ``model``."""
    change = (model - base).abs()
    p = F.softmax(model, dim=-1) + _PROBABILITY_FLOOR
    q = F.softmax(base, dim=-1) + _PROBABILITY_FLOOR
    divergence = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)  # (*rows, 1)
    return change * divergence


def outlier_threshold(scores: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``Q2 + 1.5 (Q3 − Q1)`` of ``scores``, from a sample of 10⁶ when there are more."""
    flat = scores.reshape(-1)
    if flat.numel() > _QUANTILE_SAMPLE:
        picks = torch.randint(flat.numel(), (_QUANTILE_SAMPLE,), generator=generator)
        flat = flat[picks.to(flat.device)]
    ordered = torch.sort(flat).values
    last = ordered.numel() - 1
    q1, q2, q3 = (ordered[last * k // 4] for k in (1, 2, 3))
    return q2 + _IQR_FACTOR * (q3 - q1)


@register("arcee_fusion", base="required", min_models=1, max_models=1, stochastic=True,
          result_dtype=at_least_float32,  # the float32 mask promotes the result, as in mergekit
          summary="keeps the model's changes whose KL-weighted importance is an upper outlier, "
                  "the base elsewhere (Arcee Fusion)")
def arcee_fusion(inputs: MergeInputs) -> torch.Tensor:
    """``b + (m − b) · [importance ≥ Q2 + 1.5 IQR]``."""
    assert inputs.base is not None
    base, model = inputs.base, inputs.tensors[0]
    if model.numel() == 0:
        return base.clone()
    scores = importance(model, base)
    mask = (scores >= outlier_threshold(scores, inputs.generator(0))).to(torch.float32)
    return base + (model - base) * mask
