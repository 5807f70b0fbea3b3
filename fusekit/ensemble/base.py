"""What ensemble methods and the decoders that drive them share: the three method protocols, the
counters methods keep, and what a method is built from.

A method belongs to one family, and the family says how it is driven:

- :class:`TokenMethod` (one vocabulary): every step it turns the members' next-token logits over a
  left-padded batch into scores; ``fusekit.lm.decode`` samples from them.
- :class:`CrossMethod` (different vocabularies): every step it turns each member's distribution over
  its own vocabulary into scores over one set of keys that spell bytes.
- :class:`AnswerMethod` (whole answers): the members write answers, the method picks one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, Protocol

import torch

if TYPE_CHECKING:
    from fusekit.ensemble.cascade import CascadeStats
    from fusekit.ensemble.members import Member

Family = Literal["same", "cross", "answer", "byte"]
"""``same``: one vocabulary, token by token; ``cross``: different vocabularies, token by token;
``answer``: whole answers; ``byte``: any vocabularies, byte by byte."""


class Counters(Protocol):
    """Statistics a method keeps while it decodes or scores (a ``GenerationResult`` is one)."""

    gated_steps: int  # row-steps the gate was asked about
    ensembled_steps: int  # of those, the ones where the whole ensemble decided
    cascade: CascadeStats | None  # how often each member answered (cascade only)


class MemberLogits(Protocol):
    """The members taking part in one batched decoding step, run only when asked."""

    @property
    def count(self) -> int:
        """How many members take part."""
        ...

    @property
    def primary(self) -> int:
        """Position of the primary among them."""
        ...

    @property
    def weights(self) -> torch.Tensor:
        """``(count,)`` float32 weights summing to 1."""
        ...

    def logits(self, i: int) -> torch.Tensor:
        """``(batch, vocab)`` float32 next-token logits of member ``i`` (runs it if needed)."""
        ...

    def logprobs(self, i: int) -> torch.Tensor:
        """``(batch, vocab)`` log-softmax of :meth:`logits`."""
        ...


class TokenMethod(Protocol):
    """A method over one shared vocabulary (``prob_avg``, ``logit_avg``, ``cascade``)."""

    def step(self, members: MemberLogits, done: Sequence[bool], counters: Counters) -> torch.Tensor:
        """Scores ``(batch, vocab)`` whose argmax / softmax(· / T) is the next token of each row.

        Args:
            members: the members' next-token logits, computed on demand.
            done: rows that have finished (a method need not count them).
            counters: statistics to update.
        """
        ...

    def score(self, logprobs: torch.Tensor, weights: torch.Tensor, primary: int,
              counters: Counters) -> torch.Tensor:
        """The method's log-probabilities at many positions at once, for bits per byte.

        Args:
            logprobs: ``(n_members, positions, vocab)`` every member's log-probabilities.
            weights: ``(n_members,)`` weights summing to 1.
            primary: index of the primary member.
            counters: statistics to update.

        Returns:
            ``(positions, vocab)`` log-probabilities.
        """
        ...


class CrossMethod(Protocol):
    """A method over different vocabularies (``union``, ``topk_union``, ``relative``)."""

    @property
    def gate(self) -> float | None:
        """Ensemble only where the primary's top probability is below this; None: always."""
        ...

    def scores(self, probs: dict[int, torch.Tensor], weights: dict[int, float],
               pending: bytes) -> torch.Tensor:
        """``(keys,)`` scores (log-space, ``-inf`` where not allowed) of the next key.

        Args:
            probs: member index → ``(V_i,)`` next-token probabilities (members taking part).
            weights: member index → weight, summing to 1 over ``probs``.
            pending: bytes of an unfinished UTF-8 character the next key must continue.
        """
        ...

    def spell(self, key: int) -> tuple[bytes | None, bool]:
        """What key ``key`` of :meth:`scores` writes: ``(bytes or None, is end-of-sequence)``."""
        ...

    def score_rows(self, rows: Sequence[dict[int, torch.Tensor]], targets: Sequence[int]) -> float:
        """Summed log-probability of the primary's tokens ``targets`` (one per row of ``probs``).

        Raises:
            FusekitError: the method has no full distribution (``topk_union``).
        """
        ...


class AnswerMethod(Protocol):
    """A method that chooses among whole answers (``vote``, ``mbr``)."""

    @property
    def samples(self) -> int:
        """Answers each member writes (seeds ``seed``, ``seed + 1``, ...)."""
        ...

    def pick(self, answers: Sequence[str], weights: Sequence[float]) -> int:
        """Index of the chosen answer among ``answers`` (each with its member's weight)."""
        ...


@dataclass(frozen=True)
class MethodContext:
    """What a method is built from: the loaded members, the primary and the normalised weights."""

    members: Sequence[Member]
    primary: int
    weights: Sequence[float]

    def renormalised(self, present: Sequence[int]) -> dict[int, float]:
        """Weights of the members ``present`` at one position, renormalised to sum to 1."""
        total = sum(self.weights[i] for i in present)
        return {i: self.weights[i] / total for i in present}
