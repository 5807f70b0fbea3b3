"""Cosine similarity of experts' weight updates, and average-linkage clustering of experts.

Each expert is its update ``ΔW`` over one base, flattened over every tensor. For LoRA adapters the
inner products come from the factors without forming ΔW: for a module with ``ΔW = s · B A``,
``<B_i A_i, B_j A_j> = sum((B_iᵀ B_j) ⊙ (A_i A_jᵀ))``, an ``r × r`` computation; an update stored
whole (``modules_to_save`` and saved base layers minus the base, ``lora_bias``) is added as a
dense part; DoRA modules and full fine-tunes are read tensor by tensor minus the base. Only one
tensor name of every expert is in memory at a time; sums are in float64.

Example:
    >>> gram = delta_gram(["lora/python", "lora/c", "lora/prose"])  # doctest: +SKIP
    >>> clusters = average_linkage(cosine_matrix(gram), 2)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch

from fusekit.errors import FusekitError
from fusekit.io.reader import CheckpointReader, open_reader
from fusekit.io.refs import ResolvedModel, resolve_model
from fusekit.lora.layout import AdapterLayout


@dataclass(frozen=True)
class LowRank:
    """``ΔW = scaling · B A`` (transposed into the base's layout when ``transposed``)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float
    transposed: bool

    def dense(self) -> torch.Tensor:
        """ΔW in the base tensor's layout (tests and mixed products only)."""
        product = self.b @ self.a * self.scaling
        return product.T if self.transposed else product


Delta = LowRank | torch.Tensor


def inner(x: Delta, y: Delta) -> float:
    """``<x, y>`` of two updates of one base tensor (float64), from factors where both have them."""
    if isinstance(x, LowRank) and isinstance(y, LowRank) and x.transposed == y.transposed:
        return float(((x.b.T @ y.b) * (x.a @ y.a.T)).sum()) * x.scaling * y.scaling
    if isinstance(x, LowRank) and isinstance(y, LowRank):
        return inner(x.dense(), y)
    if isinstance(x, LowRank):
        x, y = y, x
    assert isinstance(x, torch.Tensor)
    if isinstance(y, LowRank):  # x is dense: <D, s·BA> = s · sum((Bᵀ D) ⊙ A)
        d = x.T if y.transposed else x
        return float(((y.b.T @ d) * y.a).sum()) * y.scaling
    return float((x * y).sum())


class _Expert:
    """One expert's update of each base tensor, as a sum of parts (low-rank or dense, float64)."""

    def __init__(self, resolved: ResolvedModel, base: CheckpointReader, stack: ExitStack) -> None:
        self.resolved = resolved
        self.base = base
        self.layout: AdapterLayout | None = None
        if resolved.adapter is None:
            self.reader = stack.enter_context(open_reader(resolved))
            return
        from fusekit.lora.apply import AdapterReader

        self.reader = stack.enter_context(AdapterReader(resolved))
        adapter = resolved.adapter
        self.factors = stack.enter_context(CheckpointReader(
            ResolvedModel(adapter.ref, adapter.folder, (adapter.weights,))))
        self.layout = self.reader.layout

    def delta(self, name: str) -> list[Delta]:
        """The parts of the update of base tensor ``name`` (none: unchanged)."""
        layout = self.layout
        if layout is None:
            if name not in self.reader.infos:
                raise FusekitError(f"expert '{self.resolved.ref}' has no tensor {name}, which the base has; "
                                   "every expert must be a fine-tune of the base (check --base)")
            return [self.reader.get(name).double() - self.base.get(name).double()]
        module = layout.modules.get(name)
        if module is not None and module.magnitude is not None:  # DoRA: not low-rank; read it whole
            return [self.reader.get(name).double() - self.base.get(name).double()]
        parts: list[Delta] = []
        if name in layout.replaced:  # a saved copy replaces the base tensor (modules_to_save, ...)
            parts.append(self.factors.get(layout.replaced[name]).double() - self.base.get(name).double())
        if module is not None:
            parts.append(LowRank(self.factors.get(module.a).double(), self.factors.get(module.b).double(),
                                 module.scaling, module.embedding or module.fan_in_fan_out))
        bias = layout.biases.get(name)
        if bias is not None and bias.bias is not None:  # lora_B's bias, times the scaling
            parts.append(self.factors.get(bias.bias).double() * bias.scaling)
        return parts


def delta_gram(experts: Sequence[str], *, base: str | None = None) -> torch.Tensor:
    """``G[i, j] = <ΔW_i, ΔW_j>`` over every tensor of the base, float64.

    Args:
        experts: LoRA adapters (``base+adapter`` or adapter folders) and/or full fine-tunes.
        base: the base every expert is an update of; default: the adapters' common base (needed when
            some expert is a full model).

    Returns:
        ``(n, n)`` float64 Gram matrix.

    Raises:
        FusekitError: experts over different bases, a full model without ``base``, or an expert
            lacking one of the base's tensors.
    """
    resolved = [resolve_model(e, base=base) for e in experts]
    base_model = _common_base(experts, resolved, base)
    n = len(experts)
    gram = torch.zeros(n, n, dtype=torch.float64)
    with ExitStack() as stack:
        base_reader = stack.enter_context(open_reader(base_model))
        readers = [_Expert(r, base_reader, stack) for r in resolved]
        for name in _float_tensors(base_reader):
            deltas = [e.delta(name) for e in readers]
            for i, j in _pairs(n):
                gram[i, j] += sum(inner(x, y) for x in deltas[i] for y in deltas[j])
    return gram + gram.triu(1).T


def _pairs(n: int) -> Iterator[tuple[int, int]]:
    return ((i, j) for i in range(n) for j in range(i, n))


def _float_tensors(reader: CheckpointReader) -> list[str]:
    return [name for name, info in reader.infos.items() if info.dtype.is_floating_point]


def _common_base(experts: Sequence[str], resolved: Sequence[ResolvedModel],
                 base: str | None) -> ResolvedModel:
    """The base model every expert is an update of."""
    if base is not None:
        base_model = resolve_model(base)
    else:
        adapters = [r for r in resolved if r.adapter is not None]
        full = next((e for e, r in zip(experts, resolved, strict=True) if r.adapter is None), None)
        if full is not None or not adapters:
            raise FusekitError(f"expert '{full}' is a full model: give --base BASE, the model every expert "
                               "was fine-tuned from, so that its ΔW can be computed")
        base_model = resolve_model(adapters[0].base_ref or str(adapters[0].folder))
    where = Path(base_model.folder).resolve()
    for ref, r in zip(experts, resolved, strict=True):
        if r.adapter is not None and Path(r.folder).resolve() != where:
            raise FusekitError(f"adapter '{ref}' is over base {r.folder}, not {base_model.folder}; all "
                               "experts must be updates of one base")
    return base_model


def cosine_matrix(gram: torch.Tensor) -> torch.Tensor:
    """``cos[i, j] = G[i, j] / sqrt(G[i, i] G[j, j])``.

    Raises:
        FusekitError: an expert with no update at all (its cosine is undefined).
    """
    norms = gram.diagonal().clamp_min(0).sqrt()
    if bool((norms == 0).any()):
        raise FusekitError(f"expert {int((norms == 0).nonzero()[0])} does not change the base (ΔW = 0); "
                           "remove it, it has no direction to cluster by")
    return gram / norms[:, None] / norms[None, :]


def average_linkage(cos: torch.Tensor, k: int) -> list[list[int]]:
    """Agglomerative clustering with average linkage on the distance ``1 - cos``, cut at ``k`` clusters.

    Args:
        cos: ``(n, n)`` cosine similarities.
        k: how many clusters (``1 … n``).

    Returns:
        The clusters, each a sorted list of expert indices, ordered by their first member.

    Example:
        >>> cos = torch.tensor([[1.0, 0.9, 0.0], [0.9, 1.0, 0.1], [0.0, 0.1, 1.0]])
        >>> average_linkage(cos, 2)
        [[0, 1], [2]]
    """
    from fusekit.select.greedy import check_k

    n = cos.shape[0]
    check_k(k, n)
    distance = 1.0 - cos.double()
    clusters = [[i] for i in range(n)]
    while len(clusters) > k:
        best: tuple[float, int, int] | None = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                d = float(distance[clusters[a]][:, clusters[b]].mean())
                if best is None or d < best[0]:
                    best = (d, a, b)
        assert best is not None
        _, a, b = best
        clusters[a] = sorted(clusters[a] + clusters[b])
        del clusters[b]
    return sorted(clusters)


def representative(cos: torch.Tensor, cluster: Sequence[int]) -> int:
    """The member nearest the cluster's centroid of unit-length updates: ``argmax_j Σ_{i∈C} cos(j, i)``
    (``|u_j - c|² = 1 - 2 u_j·c + |c|²`` for the centroid ``c`` of the unit vectors ``u``)."""
    members = list(cluster)
    totals = cos.double()[members][:, members].sum(dim=1)
    return members[int(torch.argmax(totals))]
