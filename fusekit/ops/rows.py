"""Whole-tensor sums that do not depend on how the tensor is cut into row blocks.

Blockwise kernels (see :class:`fusekit.ops.registry.BlockwiseMerge`) gather sums such as L1 norms
and dot products over several blocks. Each row is reduced on its own in float64 (rows are never
split between blocks, so a row's sum is the same in any block), and the rows' sums are added with
``math.fsum``, which rounds once: the total is the same for every cut, one block included.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def row_sums(values: torch.Tensor) -> list[float]:
    """``Σ`` of each row of ``values`` in float64; a 1-D tensor is one row."""
    if values.numel() == 0:
        return []
    rows = values.reshape(values.shape[0] if values.dim() > 1 else 1, -1)
    return rows.sum(dim=1, dtype=torch.float64).tolist()


def exact_total(parts: list[float]) -> float:
    """The correctly rounded sum of ``parts``, whatever their order of arrival in blocks."""
    return math.fsum(parts)


class PairSums:
    """``Σ x_i · x_j`` over a tensor seen in row blocks, for the index pairs asked: the squared
    norms and dot products that angle-based kernels (slerp, nuslerp, model_stock) need."""

    def __init__(self, pairs: Sequence[tuple[int, int]]) -> None:
        self._parts: dict[tuple[int, int], list[float]] = {pair: [] for pair in pairs}

    def add(self, vectors: Sequence[torch.Tensor]) -> None:
        """Add the next block of each vector (all blocks of the same rows)."""
        for (i, j), parts in self._parts.items():
            parts.extend(row_sums(vectors[i] * vectors[j]))

    def totals(self) -> dict[tuple[int, int], float]:
        return {pair: exact_total(parts) for pair, parts in self._parts.items()}
