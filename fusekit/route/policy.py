"""From model probabilities to a choice, with one threshold trading cost against quality.

The models are put in order from cheapest to dearest (equal costs: the one that won fewer training
examples first). For a query with probabilities ``q`` (``q_m``: the chance that model ``m`` is the
best), the router picks the first model ``k`` in that order for which the chance that a dearer model
would do better, ``Q_k = sum_{j > k} q_j``, is at most the threshold ``t``:

* ``t = 1`` sends every query to the cheapest model, ``t = 0`` every query to the dearest (the
  strongest you pay for); with two models this is RouteLLM's rule, "pay for the strong model when
  its win probability exceeds t".
* the share of calls that go to models dearer than the cheapest falls as ``t`` rises, so a target
  share is met by putting ``t`` between the matching order statistics of ``Q`` on held-out queries
  (:func:`calibrate`).

Probabilities are mixed with a uniform ``1e-6`` first, so no model has probability 0 or 1 and the
extremes hold exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

EPSILON = 1e-6
DEFAULT_THRESHOLD = 0.5


def cost_order(costs: Sequence[float], strength: Sequence[float]) -> list[int]:
    """Model indices from cheapest to dearest; equal costs: weaker (fewer training wins) first."""
    return sorted(range(len(costs)), key=lambda m: (costs[m], strength[m], m))


def cheap_group(costs: Sequence[float]) -> int:
    """How many models share the lowest cost (the first that many of :func:`cost_order`)."""
    return sum(1 for c in costs if c == min(costs))


def tails(q: Tensor, order: Sequence[int]) -> Tensor:
    """``(n, N)`` probabilities → ``(n, N)`` float64 ``Q_k``: probability mass dearer than position k."""
    n_models = q.shape[1]
    q = q.double()
    mixed = q / q.sum(1, keepdim=True) * (1 - n_models * EPSILON) + EPSILON
    ordered = mixed[:, list(order)]
    return (ordered.sum(1, keepdim=True) - ordered.cumsum(1)).clamp_min(0.0)


def choose(q: Tensor, order: Sequence[int], threshold: float) -> Tensor:
    """``(n,)`` index of the chosen model for each row of ``q`` at ``threshold`` ∈ [0, 1]."""
    tail = tails(q, order)
    tail[:, -1] = 0.0
    position = (tail <= threshold).to(torch.int8).argmax(1)  # first position that is good enough
    return torch.tensor(list(order), dtype=torch.long)[position]


def choose_one(q: Sequence[float], order: Sequence[int], threshold: float) -> int:
    """:func:`choose` for one query in plain Python floats (float64, as ``choose``): routing a single
    query this way skips a dozen tensor operations on a row of N numbers."""
    n_models, total = len(q), sum(q)
    mixed = [q[m] / total * (1 - n_models * EPSILON) + EPSILON for m in order]
    tail = sum(mixed)
    for position, model in enumerate(order[:-1]):
        tail -= mixed[position]
        if max(tail, 0.0) <= threshold:
            return model
    return order[-1]


def dear_share_tail(q: Tensor, order: Sequence[int], n_cheap: int) -> Tensor:
    """``(n,)`` the value compared with the threshold when deciding to leave the cheapest models:
    a query goes to a dearer model exactly when this exceeds ``t``."""
    if n_cheap >= q.shape[1]:
        return torch.zeros(q.shape[0], dtype=torch.float64)
    return tails(q, order)[:, n_cheap - 1]


def calibrate(tail: Tensor, share: float) -> float:
    """The threshold at which a fraction ``share`` of the queries behind ``tail`` (from
    :func:`dear_share_tail`) goes to models dearer than the cheapest."""
    values = tail.double().sort(descending=True).values
    n = len(values)
    count = round(share * n)
    if n == 0 or count <= 0:
        return 1.0
    if count >= n:
        return 0.0
    return float((values[count - 1] + values[count]) / 2)
