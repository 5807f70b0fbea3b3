"""Methods over one shared vocabulary: ``prob_avg`` / ``logit_avg`` (with an optional gate) and
``cascade``. Each is a small object with the :class:`~fusekit.ensemble.base.TokenMethod` protocol;
the formulas are :mod:`fusekit.ensemble.combine`'s."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from fusekit.ensemble import combine
from fusekit.ensemble.base import Counters, MemberLogits
from fusekit.ensemble.cascade import CascadeStats, cascade_step


@dataclass(frozen=True)
class MixMethod:
    """``prob_avg`` (``log Σ w_i p_i``) or ``logit_avg`` (``log_softmax Σ w_i log p_i``).

    With ``gate``, a row where the primary's top probability is at least ``gate`` takes the primary's
    distribution, and the other members are run only when some open row needs them.

    Attributes:
        kind: ``prob_avg`` or ``logit_avg``.
        gate: the primary's confidence above which it decides alone; None: always ensemble.
    """

    kind: Literal["prob_avg", "logit_avg"]
    gate: float | None = None

    def step(self, members: MemberLogits, done: Sequence[bool], counters: Counters) -> torch.Tensor:
        """See :meth:`fusekit.ensemble.base.TokenMethod.step`."""
        if self.gate is None:
            return self._mix(members)
        primary_lp = members.logprobs(members.primary)
        sure = primary_lp.amax(dim=-1) >= math.log(self.gate)
        need = [not (s or d) for s, d in zip(sure.tolist(), done, strict=True)]
        counters.gated_steps += list(done).count(False)
        counters.ensembled_steps += sum(need)
        if not any(need):
            return primary_lp  # every open row is confident: the others are not run
        return torch.where(sure[:, None], primary_lp, self._mix(members))

    def _mix(self, members: MemberLogits) -> torch.Tensor:
        stacked = torch.stack([members.logits(i) for i in range(members.count)])
        return combine.mix_logits(stacked, members.weights, self.kind)

    def score(self, logprobs: torch.Tensor, weights: torch.Tensor, primary: int,
              counters: Counters) -> torch.Tensor:
        """See :meth:`fusekit.ensemble.base.TokenMethod.score`."""
        mix = combine.prob_avg if self.kind == "prob_avg" else combine.logit_avg
        primary_lp = logprobs[primary]
        if self.gate is not None:
            counters.gated_steps += primary_lp.shape[0]
            counters.ensembled_steps += int((~combine.confident(primary_lp, self.gate)).sum())
        return combine.gate(primary_lp, mix(logprobs, weights), self.gate)


@dataclass(frozen=True)
class CascadeMethod:
    """Members ordered cheap → expensive; each row takes the first member whose top probability is at
    least ``threshold`` (the last member always answers); later members run only when needed.

    Attributes:
        threshold: confidence a member needs to answer.
    """

    threshold: float

    def step(self, members: MemberLogits, done: Sequence[bool], counters: Counters) -> torch.Tensor:
        """See :meth:`fusekit.ensemble.base.TokenMethod.step`."""
        scores, chosen = cascade_step(members.logprobs, members.count, self.threshold)
        open_rows = torch.tensor(list(done), device=chosen.device).logical_not()
        _stats(counters, members.count).add(chosen[open_rows])
        return scores

    def score(self, logprobs: torch.Tensor, weights: torch.Tensor, primary: int,
              counters: Counters) -> torch.Tensor:
        """See :meth:`fusekit.ensemble.base.TokenMethod.score`."""
        picked, chosen = combine.cascade(logprobs, self.threshold)
        _stats(counters, logprobs.shape[0]).add(chosen)
        return picked


def _stats(counters: Counters, n_members: int) -> CascadeStats:
    """The cascade's answer counts in ``counters``, started on first use."""
    if counters.cascade is None:
        counters.cascade = CascadeStats([0] * n_members)
    return counters.cascade
