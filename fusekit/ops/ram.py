"""Reinforced Agent Merging (RAM) and its tensor-local "plus" variant.

"Reinforced Agent Merging" (arXiv:2601.13572), as in mergekit 0.1.5. With task vectors
``τ_i = θ_i − θ_base`` and an element counted as a contribution of model ``i`` when
``|τ_i| > ε``, let ``c`` (per element) be the number of contributing models. Then::

    ram:         merged = θ_base + Σ_i [|τ_i| > ε] τ_i / c      (0 where c = 0)

that is, each element is the mean of the changes that are not negligible. ``ramplus_tl``
additionally scales each model's *unique* contributions (elements where ``c = 1``) by::

    ρ_i = #{shared elements of i} / max(#{unique elements of i}, ε)
    λ_i = 1 + r · clamp(ρ_i, 0, α)

counted within the tensor (hence "tensor-local"). Both are one kernel; the variant table below
says which applies the rescaling. The arithmetic runs in the compute dtype in mergekit's order,
except that ``λ`` is float32 as in mergekit, so ``ramplus_tl`` on half-precision inputs gives a
float32 result. Where mergekit's ``ρ`` is 0/0 (``ε ≤ 0`` and a model with no contribution in the
tensor) mergekit produces NaN everywhere; here that model's ``λ`` is 1, which changes nothing else.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import torch
from pydantic import Field

from fusekit.ops.registry import MergeInputs, Params, at_least_float32, register

_EPSILON_HELP = "a task-vector element counts as a contribution when its magnitude exceeds this"


class RamParams(Params):
    epsilon: float = Field(1e-5, description=_EPSILON_HELP)


class RamPlusParams(Params):
    r: float = Field(0.1, description="strength of the boost to each model's unique changes")
    alpha: float = Field(0.2, description="cap on the shared/unique ratio used for the boost")
    epsilon: float = Field(1e-5, description=_EPSILON_HELP)


@dataclass(frozen=True)
class _Variant:
    name: str
    params: type[Params]
    rescale_unique: bool
    summary: str


_VARIANTS = (
    _Variant("ram", RamParams, False,
             "adds to the base, per element, the mean of the task-vector changes larger than "
             "epsilon (Reinforced Agent Merging)"),
    _Variant("ramplus_tl", RamPlusParams, True,
             "RAM, with each model's unique changes scaled up by its shared/unique ratio in "
             "the tensor (RAM+, tensor-local)"),
)


def unique_scale(active: torch.Tensor, shared: torch.Tensor, unique: torch.Tensor, *,
                 r: float, alpha: float, epsilon: float) -> torch.Tensor:
    """``λ_i = 1 + r · clamp(shared_i / max(unique_i, ε), 0, α)``: float32, ``(n_models,)``."""
    shared_counts = (active & shared).sum(dim=1)  # (n_models,) int64
    unique_counts = (active & unique).sum(dim=1)  # (n_models,) int64
    ratio = shared_counts / unique_counts.clamp(min=epsilon)  # float32
    ratio = torch.where(ratio.isnan(), torch.zeros_like(ratio), ratio)  # 0/0: only if epsilon <= 0
    return 1 + r * ratio.clamp(min=0, max=alpha)


def reinforced_merge(inputs: MergeInputs, *, rescale_unique: bool) -> torch.Tensor:
    """``θ_base + Σ_i [|τ_i| > ε] τ_i · (λ_i if c = 1 else 1 / c)``, λ_i = 1 for plain RAM."""
    assert inputs.base is not None
    base = inputs.base
    if not inputs.tensors:
        return base
    epsilon = cast(RamParams | RamPlusParams, inputs.params).epsilon
    deltas = torch.stack([t - base for t in inputs.tensors]).reshape(len(inputs.tensors), -1)
    active = deltas.abs() > epsilon  # (n_models, numel)
    contributors = active.sum(dim=0, keepdim=True)  # (1, numel) int64
    shared, unique = contributors > 1, contributors == 1  # (1, numel)
    kept = deltas * active  # (n_models, numel)
    unique_part = kept * unique
    if rescale_unique:
        plus = cast(RamPlusParams, inputs.params)
        scale = unique_scale(active, shared, unique, r=plus.r, alpha=plus.alpha, epsilon=epsilon)
        unique_part = unique_part * scale.unsqueeze(-1)
    shared_part = kept * shared / contributors.clamp(min=1)
    merged = (unique_part + shared_part).sum(dim=0, keepdim=True)  # (1, numel)
    return base + merged.reshape_as(base)


def _scratch(rescale_unique: bool) -> Callable[[int, int], int]:
    """Temporaries per element: per model the delta, its kept, unique and shared parts and a
    mask; an int64 contributor count and its clamp; the sums; float32 scales for RAM+."""

    def per_element(n_inputs: int, size: int) -> int:
        models = max(1, n_inputs - 1)
        return models * (5 * size + 1 + (4 if rescale_unique else 0)) + 18 + 2 * size

    return per_element


for _variant in _VARIANTS:
    register(_variant.name, method_params=_variant.params, base="required", min_models=0,
             summary=_variant.summary, scratch=_scratch(_variant.rescale_unique),
             # ramplus_tl's float32 scales promote half-precision results, as in mergekit
             result_dtype=at_least_float32 if _variant.rescale_unique else None,
             )(partial(reinforced_merge, rescale_unique=_variant.rescale_unique))
