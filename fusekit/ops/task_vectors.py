"""Task-vector merging: task arithmetic, TIES, DARE, Model Breadcrumbs, DELLA and SCE.

With task vectors ``τ_i = θ_i − θ_base`` every method here is one pipeline::

    τ̃_i   = sparsify(τ_i; density_i, gamma_i, epsilon_i, rescale)      (see fusekit.ops.sparsify)
    m_i    = [sign(w_i τ̃_i) = sign(Σ_j w_j τ̃_j)]                       sign election ("sum"),
             or the sign of Σ_j sign(w_j τ̃_j) ("count"); 1 everywhere without consensus
    merged = θ_base + λ · Σ_i m_i w_i τ̃_i  (÷ Σ_i m_i w_i when normalize)

and the methods differ only in their row of :data:`METHODS` (sparsifier, consensus, defaults):

- task_arithmetic — Ilharco et al., "Editing Models with Task Arithmetic" (arXiv:2212.04089).
- ties — Yadav et al., "TIES-Merging" (arXiv:2306.01708): magnitude top-k + sign election.
- dare_linear / dare_ties — Yu et al., "Language Models are Super Mario" (arXiv:2311.03099):
  random drop, rescaled.
- breadcrumbs / breadcrumbs_ties — Davari & Belilovsky, "Model Breadcrumbs"
  (arXiv:2312.06795): drop the smallest and the ``gamma`` largest magnitudes.
- della / della_linear — Deep et al., "DELLA-Merging" (arXiv:2406.11617): drop with
  probabilities falling with the magnitude rank.
- sce — Wan et al., "FuseChat" (arXiv:2408.07990): keep the ``select_topk`` entries of largest
  variance across models, elect signs on the unweighted vectors, then weight each model by its
  energy ``e_i = mean(τ_i²) / Σ_j mean(τ_j²)`` (``1/n`` each when ``Σ_j mean(τ_j²) < 1e-6``)::

      merged = θ_base + Σ_i m_i e_i τ̃_i / max(Σ_i m_i e_i, 1e-6)

Numbers follow mergekit 0.1.5: all arithmetic in the compute dtype (bfloat16 stays bfloat16; the
weights are rounded to it too), in mergekit's order. The normalising divisor counts as 1 where it is
0 (with consensus) or below 1e-8 in magnitude (without). ``int8_mask`` only changes mergekit's
memory use, so it is accepted and has no effect; task_arithmetic accepts ``density`` and
``rescale`` for the same reason mergekit does, and ignores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, BeforeValidator, Field, ValidationInfo, create_model, field_validator

from fusekit.ops import sparsify
from fusekit.ops.registry import MergeInputs, NoParams, Params, TensorContext, register, whole_tensor
from fusekit.ops.sparsify import Sparsifier

Consensus = Literal["sum", "count"]
Weighting = Literal["weight", "energy"]

_TINY_WEIGHT_SUM = 1e-8
_TINY_ENERGY = 1e-6


# -- parameters ---------------------------------------------------------------------------------------


def _in_unit_interval(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool) and not 0 <= value <= 1:
        raise ValueError("must be in [0, 1]")
    return value


def _not_negative(value: object) -> object:
    if isinstance(value, int | float) and not isinstance(value, bool) and not value >= 0:
        raise ValueError("must be at least 0")
    return value


Fraction = Annotated[float, BeforeValidator(_in_unit_interval), Field(ge=0, le=1)]
NonNegative = Annotated[float, BeforeValidator(_not_negative), Field(ge=0)]


class TaskVectorModelParams(Params):
    weight: float = Field(description="scale of this model's task vector")
    density: Fraction = Field(1.0, description="fraction of the task vector's entries to keep "
                                               "(1 keeps all; unused by task_arithmetic)")


class BreadcrumbsModelParams(TaskVectorModelParams):
    gamma: Fraction = Field(0.01, description="fraction of the largest-magnitude entries dropped "
                                              "as outliers")


class DellaModelParams(TaskVectorModelParams):
    epsilon: NonNegative = Field(0.15, validate_default=True,
                                 description="keep probabilities run from density − epsilon "
                                             "(smallest magnitude) to density + epsilon (largest)")

    @field_validator("epsilon")
    @classmethod
    def _probabilities_inside_unit_interval(cls, epsilon: float, info: ValidationInfo) -> float:
        density = info.data.get("density")
        if density is None or not 0 < density < 1:
            return epsilon
        if density + epsilon >= 1 or density - epsilon <= 0:
            raise ValueError(
                f"density ± epsilon must lie inside (0, 1), got density {density} and epsilon "
                f"{epsilon}; choose epsilon below {min(density, 1 - density):g}")
        return epsilon


class TaskVectorParams(Params):
    normalize: bool = Field(False, description="divide by the sum of the (elected) weights")
    rescale: bool = Field(False, description="scale each sparsified task vector back to its L1 norm")
    lambda_: float = Field(1.0, alias="lambda", description="scale of the merged task vector")
    int8_mask: bool = Field(False, description="accepted for mergekit compatibility; no effect")


def _defaults(name: str, *, normalize: bool, rescale: bool) -> type[TaskVectorParams]:
    """``TaskVectorParams`` with a method's own defaults for ``normalize`` and ``rescale``."""
    return create_model(
        name, __base__=TaskVectorParams,
        normalize=(bool, Field(normalize, description="divide by the sum of the (elected) weights")),
        rescale=(bool, Field(rescale, description="scale each sparsified task vector back to its "
                                                  "L1 norm")),
    )


class SceParams(Params):
    int8_mask: bool = Field(False, description="accepted for mergekit compatibility; no effect")
    select_topk: Fraction = Field(1.0, description="fraction of entries kept, those whose "
                                                   "variance across the models is largest")


# -- the table ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskVectorMethod:
    """One row of the task-vector family.

    Attributes:
        sparsifier: how each task vector is thinned (``density`` and friends), or None.
        consensus: sign election, or None to add every entry.
        weighting: ``"weight"`` — the recipe's ``weight`` per model, applied before the election;
            ``"energy"`` — SCE's data-derived weights, applied after electing on plain vectors.
        select: SCE's joint variance selection by ``select_topk``.
    """

    name: str
    sparsifier: Sparsifier | None
    consensus: Consensus | None
    model_params: type[Params]
    method_params: type[Params]
    summary: str
    weighting: Weighting = "weight"
    select: bool = False

    @property
    def stochastic(self) -> bool:
        return self.sparsifier in ("random", "della_magprune")

    @property
    def elementwise(self) -> bool:
        return self.sparsifier is None and self.consensus is None and self.weighting == "weight"

    def scratch(self, n_inputs: int, size: int) -> int:
        """Bytes of kernel temporaries per element (measured peaks, rounded up).

        The stacked task vectors stay while one model at a time is sparsified (int64 ranks for
        DELLA, float32 draws for the random rules), then the election and the weighted sums each
        take about one more stack.
        """
        models, wide = n_inputs - 1, max(size, 4)
        sparsify = {None: size, "magnitude": 4 * size + 10, "magnitude_outliers": 4 * size + 10,
                    "random": 3 * wide + 5, "della_magprune": 3 * wide + 28}[self.sparsifier]
        stacks = 3 if self.weighting == "energy" else 2
        combine = stacks * models * size + 2 * models + 3 * size if self.consensus else 2 * size
        return models * size + max(sparsify, combine)


METHODS: tuple[TaskVectorMethod, ...] = (
    TaskVectorMethod(
        "task_arithmetic", None, None, TaskVectorModelParams,
        _defaults("TaskArithmeticParams", normalize=False, rescale=False),
        "adds the weighted task vectors (model − base) to the base"),
    TaskVectorMethod(
        "ties", "magnitude", "sum", TaskVectorModelParams,
        _defaults("TiesParams", normalize=True, rescale=False),
        "TIES: keeps each task vector's largest entries, elects a sign per entry and averages "
        "the agreeing ones"),
    TaskVectorMethod(
        "dare_linear", "random", None, TaskVectorModelParams,
        _defaults("DareLinearParams", normalize=False, rescale=True),
        "DARE: drops task-vector entries at random, rescales and adds them"),
    TaskVectorMethod(
        "dare_ties", "random", "sum", TaskVectorModelParams,
        _defaults("DareTiesParams", normalize=False, rescale=True),
        "DARE with TIES sign election: random drop, rescale, keep the agreeing signs"),
    TaskVectorMethod(
        "breadcrumbs", "magnitude_outliers", None, BreadcrumbsModelParams,
        _defaults("BreadcrumbsParams", normalize=False, rescale=False),
        "Model Breadcrumbs: drops the smallest and the largest (outlier) task-vector entries"),
    TaskVectorMethod(
        "breadcrumbs_ties", "magnitude_outliers", "sum", BreadcrumbsModelParams,
        _defaults("BreadcrumbsTiesParams", normalize=False, rescale=False),
        "Model Breadcrumbs with TIES sign election"),
    TaskVectorMethod(
        "della", "della_magprune", "sum", DellaModelParams,
        _defaults("DellaParams", normalize=True, rescale=True),
        "DELLA: drops entries with probabilities falling with their magnitude rank, rescales, "
        "elects signs"),
    TaskVectorMethod(
        "della_linear", "della_magprune", None, DellaModelParams,
        _defaults("DellaLinearParams", normalize=False, rescale=True),
        "DELLA without sign election: magnitude-ranked random drop, rescale, weighted sum"),
    TaskVectorMethod(
        "sce", None, "sum", NoParams, SceParams,
        "SCE: keeps the entries that vary most across models, elects signs, weights each model "
        "by its task vector's energy", weighting="energy", select=True),
)


# -- the engine ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Settings:
    normalize: bool
    rescale: bool
    lambda_: float
    select_topk: float


def _settings(params: BaseModel) -> _Settings:
    if isinstance(params, SceParams):
        return _Settings(normalize=True, rescale=False, lambda_=1.0, select_topk=params.select_topk)
    assert isinstance(params, TaskVectorParams)
    return _Settings(normalize=params.normalize, rescale=params.rescale, lambda_=params.lambda_,
                     select_topk=1.0)


def weight_column(weights: list[float], like: torch.Tensor) -> torch.Tensor:
    """Weights shaped ``(n_models, 1, ..., 1)`` to broadcast against a ``(n_models, *shape)`` stack."""
    column = torch.tensor(weights, dtype=like.dtype, device=like.device)
    return column.view(-1, *([1] * (like.dim() - 1)))


def _rule(sparsifier: Sparsifier, params: BaseModel, *, rescale: bool) -> sparsify.SparsifyRule:
    assert isinstance(params, TaskVectorModelParams)
    return sparsify.SparsifyRule(sparsifier, params.density, gamma=getattr(params, "gamma", 0.0),
                                 epsilon=getattr(params, "epsilon", 0.0), rescale=rescale)


def task_vectors(inputs: MergeInputs) -> torch.Tensor:
    """``τ_i = θ_i − θ_base``: ``(n_models, *shape)``."""
    base = inputs.base
    assert base is not None
    deltas = base.new_empty((len(inputs.tensors), *base.shape))  # (n_models, *shape)
    for index, tensor in enumerate(inputs.tensors):
        torch.sub(tensor, base, out=deltas[index])
    return deltas


def sign_agreement(deltas: torch.Tensor, consensus: Consensus) -> torch.Tensor:
    """Where each entry's sign equals the elected one: ``(n_models, *shape)`` bool.

    ``"sum"`` elects the sign of ``Σ_i τ_i`` (summed in the deltas' dtype), ``"count"`` the sign of
    ``Σ_i sign(τ_i)``; 0 elects +. Zero entries never agree.
    """
    signs = deltas.sign().to(torch.int8)  # (n_models, *shape)
    total = deltas.sum(dim=0) if consensus == "sum" else signs.sum(dim=0)  # (*shape)
    elected = (total >= 0).to(torch.int8) * 2 - 1  # (*shape)
    return signs == elected


def _weighted_mix(deltas: torch.Tensor, weights: torch.Tensor, consensus: Consensus | None, *,
                  normalize: bool) -> torch.Tensor:
    """``Σ_i m_i w_i τ_i`` (÷ ``Σ_i m_i w_i``): ``(*shape)``; ``deltas`` is scaled in place."""
    deltas.mul_(weights)  # (n_models, *shape)
    if consensus is None:
        mixed = deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < _TINY_WEIGHT_SUM] = 1
    else:
        # 0/1 in the deltas' dtype: the products equal those with the bool mask, computed faster
        agree = sign_agreement(deltas, consensus).to(deltas.dtype)  # (n_models, *shape)
        mixed = (deltas * agree).sum(dim=0)
        divisor = (weights * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    return mixed / divisor if normalize else mixed


def energy_weights(deltas: torch.Tensor) -> torch.Tensor:
    """SCE's ``mean(τ_i²) / Σ_j mean(τ_j²)``, or ``1/n`` each when the sum is below 1e-6.

    Returns ``(n_models, 1, ..., 1)`` in the deltas' dtype.
    """
    energy = deltas.square().reshape(deltas.shape[0], -1).mean(dim=1)  # (n_models,)
    total = float(energy.sum())
    weights = torch.ones_like(energy) / energy.numel() if abs(total) < _TINY_ENERGY else energy / total
    return weights.view(-1, *([1] * (deltas.dim() - 1)))


def _energy_mix(deltas: torch.Tensor, consensus: Consensus | None) -> torch.Tensor:
    """``Σ_i m_i e_i τ_i / max(Σ_i m_i e_i, 1e-6)``: ``(*shape)``."""
    weights = energy_weights(deltas)  # (n_models, 1, ..., 1)
    kept = weights * sign_agreement(deltas, consensus) if consensus else weights
    return (deltas * kept).sum(dim=0) / kept.sum(dim=0).clamp(min=_TINY_ENERGY)


class TaskVectorPasses:
    """The weighted rows (all but SCE) as a :class:`~fusekit.ops.registry.BlockwiseMerge`.

    Each model's task vector has its own :class:`~fusekit.ops.sparsify.SparsifierStream`, which
    says which statistics passes it needs (magnitude counts, L1 norms); the sign election and the
    weighted sum are per element, so :meth:`apply` does them block by block. Model ``i`` draws from
    ``context.generator(i)``, so its mask depends only on the seed, the tensor name and ``i``.
    """

    def __init__(self, method: TaskVectorMethod, context: TensorContext) -> None:
        self.method = method
        self.settings = _settings(context.params)
        self.weights = _weights(context.model_params)
        sparsifier = method.sparsifier
        self.streams = [None if sparsifier is None else sparsify.SparsifierStream(
            _rule(sparsifier, params, rescale=self.settings.rescale), shape=context.shape,
            dtype=context.dtype, generator=partial(context.generator, index))
            for index, params in enumerate(context.model_params)]
        self.stages = [stage for stage in sparsify.STAGES
                       if any(stream is not None and stream.needs(stage) for stream in self.streams)]
        self.passes = len(self.stages)
        self.numel = math.prod(context.shape)
        self._kept: tuple[MergeInputs, list[torch.Tensor | None]] | None = None

    def _deltas(self, block: MergeInputs) -> list[torch.Tensor | None]:
        """The block's task vectors; kept between passes when the block is the whole tensor."""
        if self._kept is not None and self._kept[0] is block:
            return self._kept[1]
        assert block.base is not None
        deltas: list[torch.Tensor | None] = [tensor - block.base for tensor in block.tensors]
        whole = block.base.numel() == self.numel
        self._kept = (block, deltas) if whole else None
        return deltas

    def observe(self, stage: int, block: MergeInputs) -> None:
        for stream, delta in zip(self.streams, self._deltas(block), strict=True):
            if stream is not None and delta is not None:
                stream.observe(self.stages[stage], delta)

    def end_pass(self, stage: int) -> None:
        for stream in self.streams:
            if stream is not None:
                stream.end_pass(self.stages[stage])

    def apply(self, block: MergeInputs) -> torch.Tensor:
        """``θ_base + λ · mix(sparsify(θ_i − θ_base))`` for the next block."""
        base = block.base
        assert base is not None
        if not block.tensors:
            return base
        kept = self._kept[1] if self._kept is not None and self._kept[0] is block else None
        self._kept = None
        deltas = base.new_empty((len(block.tensors), *base.shape))  # (n_models, *shape)
        for index, (tensor, stream) in enumerate(zip(block.tensors, self.streams, strict=True)):
            delta = kept[index] if kept is not None else None
            if kept is not None:
                kept[index] = None  # free each model's copy once it is in the stack
            delta = tensor - base if delta is None else delta
            deltas[index] = delta if stream is None else stream.apply(delta)
            del delta
        weights = weight_column(self.weights, deltas)  # (n_models, 1, ..., 1)
        mixed = _weighted_mix(deltas, weights, self.method.consensus, normalize=self.settings.normalize)
        if self.settings.lambda_ != 1:
            mixed = mixed * self.settings.lambda_
        return (base + mixed).to(base.dtype)


def merge_sce(inputs: MergeInputs, method: TaskVectorMethod) -> torch.Tensor:
    """SCE on a whole tensor: its variance selection and energy weights need every task vector at
    once. Returns the base itself when no other model contributes to this tensor."""
    base = inputs.base
    assert base is not None
    if not inputs.tensors:
        return base
    settings = _settings(inputs.params)
    deltas = task_vectors(inputs)  # (n_models, *shape)
    if settings.select_topk < 1:
        deltas = deltas * sparsify.variance_top_mask(deltas, settings.select_topk)
    return (base + _energy_mix(deltas, method.consensus)).to(base.dtype)


def _weights(model_params: Sequence[BaseModel]) -> list[float]:
    weights = []
    for params in model_params:
        assert isinstance(params, TaskVectorModelParams)
        weights.append(params.weight)
    return weights


for _method in METHODS:
    _blockwise = None if _method.select else partial(TaskVectorPasses, _method)
    register(_method.name, model_params=_method.model_params, method_params=_method.method_params,
             base="required", min_models=1, summary=_method.summary,
             stochastic=_method.stochastic, elementwise=_method.elementwise,
             scratch=_method.scratch, blockwise=_blockwise,
             )(whole_tensor(_blockwise) if _blockwise else partial(merge_sce, method=_method))
