"""Token-level cascade: members ordered cheap → expensive, each consulted only when needed.

The cheapest member proposes every token; where its top probability is below the threshold the
next member is run (catching up on the tokens it has not seen yet, in one forward pass), and so on;
the last member always answers. Expensive members therefore run only on the hard steps.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from fusekit.ensemble.combine import confident


@dataclass
class CascadeStats:
    """How often each member answered: ``answered[i]`` token positions went to member ``i``."""

    answered: list[int] = field(default_factory=list)

    @property
    def positions(self) -> int:
        return sum(self.answered)

    @property
    def escalation_rate(self) -> float:
        """Share of positions the first (cheapest) member did not answer."""
        return 1 - self.answered[0] / self.positions if self.positions else 0.0

    def add(self, chosen: torch.Tensor) -> None:
        counts = torch.bincount(chosen.flatten().cpu(), minlength=len(self.answered))
        for i, c in enumerate(counts.tolist()):
            self.answered[i] += int(c)


def cascade_step(logprobs_of: Callable[[int], torch.Tensor], n_members: int,
                 threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One step for a batch: ``logprobs_of(i)`` gives member ``i``'s ``(batch, vocab)``
    log-probabilities and is called only while some row still lacks a confident answer.

    Returns:
        ``(log-probs (batch, vocab), answering member per row (batch,))``.
    """
    result = logprobs_of(0).clone()
    chosen = torch.zeros(result.shape[0], dtype=torch.long, device=result.device)
    open_rows = ~confident(result, threshold)
    for i in range(1, n_members):
        if not bool(open_rows.any()):
            break
        lp = logprobs_of(i)
        last = i == n_members - 1
        take = open_rows if last else open_rows & confident(lp, threshold)
        result[take] = lp[take]
        chosen[take] = i
        open_rows = open_rows & ~take
    return result, chosen
