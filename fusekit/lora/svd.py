"""Truncated SVD of a weight difference, exact or randomized, and the rank an energy share asks for.

Pure functions over tensors: no files, no options. :func:`truncated_svd` picks the method by the
matrix's size and the rank wanted (see :func:`use_randomized`); the randomized method draws its test
matrix from a caller's ``torch.Generator`` on the CPU, so a result depends on the seed alone, not on
the device or thread count.

Example:
    >>> import torch
    >>> delta = torch.randn(64, 8) @ torch.randn(8, 48)
    >>> u, s, vh = truncated_svd(delta, 8)
    >>> bool(torch.allclose((u * s) @ vh, delta, atol=1e-3))
    True
"""

from __future__ import annotations

from typing import Literal

import torch

SvdMethod = Literal["auto", "exact", "randomized"]
Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # u (m, k), s (k,), vh (k, n)

# Randomized SVD settings, chosen by measurement (scripts/bench_lora.py and the notes in README):
# oversampling to 2r (at least r + 10) and two power iterations keep the rank-r error within 1 % of
# the optimum on noise-like and low-rank-plus-noise differences up to 1024x2816, and the method is
# 3x to 400x faster than a full SVD when its sketch is at most half of min(m, n) on 256+ dimensions.
MIN_OVERSAMPLE = 10
POWER_ITERATIONS = 2
RANDOMIZED_MIN_DIM = 256


def sketch_size(rank: int, k: int) -> int:
    """Columns of the random sketch for a rank-``rank`` approximation of a matrix with ``k = min(m, n)``."""
    return min(k, max(2 * rank, rank + MIN_OVERSAMPLE))


def use_randomized(shape: tuple[int, int], rank: int) -> bool:
    """Whether the randomized method is the faster one for this matrix and rank (the ``auto`` rule).

    Args:
        shape: ``(m, n)`` of the matrix.
        rank: the largest rank wanted.

    Returns:
        True when ``min(m, n) >= 256`` and the sketch is at most half of ``min(m, n)``.
    """
    k = min(shape)
    return k >= RANDOMIZED_MIN_DIM and 2 * sketch_size(rank, k) <= k


def truncated_svd(delta: torch.Tensor, rank: int, *, method: SvdMethod = "auto",
                  generator: torch.Generator | None = None) -> Triplets:
    """The leading ``rank`` singular triplets of ``delta``: ``delta ≈ (u * s) @ vh``.

    Args:
        delta: ``(m, n)`` floating-point matrix, on any device.
        rank: how many triplets to return, ``1 <= rank <= min(m, n)``.
        method: ``exact`` (``torch.linalg.svd``), ``randomized`` (a sketch of :func:`sketch_size`
            columns refined by two power iterations, Halko, Martinsson and Tropp 2011, Alg. 4.4) or
            ``auto`` (:func:`use_randomized`).
        generator: CPU generator for the randomized sketch (default: a fixed seed).

    Returns:
        ``u`` ``(m, rank)``, ``s`` ``(rank,)`` in descending order, ``vh`` ``(rank, n)``.
    """
    m, n = delta.shape
    randomized = method == "randomized" or (method == "auto" and use_randomized((m, n), rank))
    if randomized and sketch_size(rank, min(m, n)) < min(m, n):
        u, s, vh = randomized_svd(delta, sketch_size(rank, min(m, n)), generator=generator)
    else:
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


def randomized_svd(delta: torch.Tensor, columns: int, *, iterations: int = POWER_ITERATIONS,
                   generator: torch.Generator | None = None) -> Triplets:
    """Approximate SVD of ``delta`` from a random sketch of ``columns`` columns.

    Q spans ``delta @ omega`` after ``iterations`` rounds of re-orthonormalised power iteration
    (``Q ← orth(delta @ orth(deltaᵀ @ Q))``); the SVD of the small ``Qᵀ delta`` gives the triplets.

    Args:
        delta: ``(m, n)`` matrix.
        columns: sketch width ``q``; the result holds ``q`` triplets.
        iterations: power iterations (each sharpens the spectrum's decay).
        generator: CPU generator for ``omega`` ``(n, q)``.

    Returns:
        ``u`` ``(m, q)``, ``s`` ``(q,)``, ``vh`` ``(q, n)``.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    omega = torch.randn(delta.shape[1], columns, generator=gen, dtype=delta.dtype).to(delta.device)
    q = torch.linalg.qr(delta @ omega).Q  # (m, q)
    for _ in range(iterations):
        z = torch.linalg.qr(delta.T @ q).Q  # (n, q)
        q = torch.linalg.qr(delta @ z).Q
    small_u, s, vh = torch.linalg.svd(q.T @ delta, full_matrices=False)  # (q, q), (q,), (q, n)
    return q @ small_u, s, vh


def energy_rank(s: torch.Tensor, total: float, energy: float, cap: int) -> int:
    """The smallest rank whose squared singular values hold ``energy`` of ``total``, at most ``cap``.

    Args:
        s: leading singular values, descending (all of them, or at least ``cap``).
        total: ``||delta||_F²``, the sum of every squared singular value.
        energy: the share wanted, in ``(0, 1]``.
        cap: the largest rank allowed (``--max-rank``, or ``min(m, n)``).

    Returns:
        A rank in ``[1, cap]``; ``cap`` when the values given do not reach the share, or when
        ``energy`` is 1.

    Example:
        >>> energy_rank(torch.tensor([3.0, 1.0]), 10.0, 0.9, 2)
        1
    """
    if energy >= 1:  # every singular value, whatever float rounding says of the last ones
        return cap
    reached = torch.nonzero(torch.cumsum(s.double() ** 2, 0) >= energy * total)
    rank = int(reached[0]) + 1 if len(reached) else cap
    return max(1, min(rank, cap))
