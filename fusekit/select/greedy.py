"""Greedy forward selection: grow a subset one expert at a time, each time adding the expert that
lowers the subset's objective (bits per byte) the most.

Example:
    >>> scores = {(0,): 3.0, (1,): 2.0, (2,): 2.5, (0, 1): 1.9, (1, 2): 1.5}
    >>> steps = greedy_select(3, 2, lambda s: scores.get(tuple(sorted(s)), 9.0))
    >>> [(s.added, s.score) for s in steps]
    [(1, 2.0), (2, 1.5)]
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fusekit.errors import FusekitError

Objective = Callable[[Sequence[int]], float]
"""Bits per byte of a subset of experts (given by index); lower is better."""


@dataclass(frozen=True)
class Step:
    """One step of a selection.

    Attributes:
        added: the expert added at this step.
        subset: the experts chosen so far, in the order they were added.
        score: the objective of ``subset``.
        tried: each candidate expert of this step → the objective of the subset with it.
    """

    added: int
    subset: tuple[int, ...]
    score: float
    tried: dict[int, float] = field(default_factory=dict)


def check_k(k: int, n: int) -> None:
    """Refuse a subset size outside ``1 … n``.

    Raises:
        FusekitError: one line saying what ``k`` may be.
    """
    if not 1 <= k <= n:
        raise FusekitError(f"-k {k}: must be between 1 and the number of experts ({n})")


def greedy_select(n: int, k: int, objective: Objective) -> list[Step]:
    """Forward selection of ``k`` of ``n`` experts.

    Args:
        n: how many experts there are (indices ``0 … n-1``).
        k: how many to choose.
        objective: the score of a subset (lower is better); called ``n + (n-1) + … + (n-k+1)`` times.

    Returns:
        ``k`` steps; step ``j`` adds the expert whose addition gives the lowest objective (ties: the
        lower index).

    Raises:
        FusekitError: ``k`` outside ``1 … n``.
    """
    check_k(k, n)
    chosen: list[int] = []
    steps: list[Step] = []
    for _ in range(k):
        tried = {i: objective([*chosen, i]) for i in range(n) if i not in chosen}
        best = min(tried, key=lambda i: (tried[i], i))
        chosen.append(best)
        steps.append(Step(best, tuple(chosen), tried[best], tried))
    return steps
