"""What ``Ensemble.generate`` returns: one :class:`Answer` per prompt and run statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fusekit.ensemble.cascade import CascadeStats


@dataclass
class Answer:
    """One generated answer.

    Attributes:
        prompt: the prompt it continues.
        text: the new text.
        new_tokens: tokens decoded for it (for ``vote``/``mbr``: the chosen candidate's tokens, under
            its member's tokenizer).
        finished: whether it stopped at end-of-sequence rather than at ``max_new_tokens``.
        candidates: ``vote``/``mbr`` only: every member's answer.
    """

    prompt: str
    text: str
    new_tokens: int
    finished: bool
    candidates: list[str] | None = None


@dataclass
class GenerationResult:
    """Answers and statistics of one ``Ensemble.generate`` call.

    Attributes:
        answers: one per prompt, in order.
        seconds: wall-clock time of the call.
        forwarded_tokens: per member, token positions run through it.
        cascade: ``cascade`` only: how often each member answered.
        ensembled_steps: steps where the gate let the whole ensemble decide.
        gated_steps: steps the gate was asked about.
    """

    answers: list[Answer]
    seconds: float
    forwarded_tokens: list[int]
    cascade: CascadeStats | None = None
    ensembled_steps: int = 0
    gated_steps: int = 0

    @property
    def new_tokens(self) -> int:
        """Tokens of all answers together."""
        return sum(a.new_tokens for a in self.answers)

    def summary(self) -> dict[str, Any]:
        """The statistics as a JSON-ready dict (answers, tokens, speed, forwarded tokens, and the
        cascade's escalation rate or the gate's ensembled share where they apply).

        Returns:
            A dict with ``answers``, ``new_tokens``, ``seconds``, ``tokens_per_second``,
            ``forwarded_tokens`` and, where they apply, ``escalation_rate``, ``answered_by``,
            ``ensembled_share``.
        """
        rate = round(self.new_tokens / self.seconds, 2) if self.seconds else None
        out: dict[str, Any] = {"answers": len(self.answers), "new_tokens": self.new_tokens,
                               "seconds": round(self.seconds, 4), "tokens_per_second": rate,
                               "forwarded_tokens": self.forwarded_tokens}
        if self.cascade is not None:
            out["escalation_rate"] = round(self.cascade.escalation_rate, 4)
            out["answered_by"] = self.cascade.answered
        if self.gated_steps:
            out["ensembled_share"] = round(self.ensembled_steps / self.gated_steps, 4)
        return out
