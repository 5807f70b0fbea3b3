"""``method: byte``: mix the members' next-byte distributions with their weights.

Each member follows the text as a :class:`~fusekit.ensemble.bytes.beam.ByteBeam`, so members with
different tokenizers never have to agree on token boundaries; the mixture ``Σ_i w_i p_i(b | x)`` is a
proper distribution over the next byte and the end symbol. With ``gate`` set, a position where the
primary's most likely byte has at least that probability takes the primary's distribution alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fusekit.ensemble.base import MethodContext
from fusekit.ensemble.bytes.beam import ByteBeam


class ByteMixer:
    """The members' byte beams over one text, and their mixture.

    Args:
        context: the ensemble's members, primary and weights.
        beam: tokenizations each member keeps.
        gate: ensemble only where the primary's top byte probability is below this; None: always.
        window: longest token sequence each member reads (default: its maximum positions).

    Attributes:
        beams: one :class:`ByteBeam` per member, in member order.
        gated_steps, ensembled_steps: positions the gate was asked about, and those mixed.
    """

    def __init__(self, context: MethodContext, beam: int, gate: float | None,
                 window: int | None = None) -> None:
        self.beams = [ByteBeam(m.lm, m.vocab, beam=beam, context=window) for m in context.members]
        self.weights = torch.tensor(list(context.weights), dtype=torch.float64)
        self.primary = context.primary
        self.gate = gate
        self.gated_steps = 0
        self.ensembled_steps = 0

    def members(self) -> list[torch.Tensor]:
        """Each member's ``(257,)`` next-byte distribution."""
        return [b.distribution() for b in self.beams]

    def distribution(self, members: list[torch.Tensor] | None = None) -> torch.Tensor:
        """``(257,)`` float64: the weighted mixture (or the confident primary's distribution)."""
        members = self.members() if members is None else members
        if self.gate is not None:
            self.gated_steps += 1
            if float(members[self.primary].max()) >= self.gate:
                return members[self.primary]
        self.ensembled_steps += 1
        return torch.mv(torch.stack(members).T, self.weights)

    def advance(self, byte: int) -> None:
        """Every member reads one more byte."""
        for b in self.beams:
            b.advance(byte)

    @property
    def pruned_nats(self) -> list[float]:
        """Each member's mass dropped by its beam so far (nats)."""
        return [b.pruned_nats for b in self.beams]


@dataclass(frozen=True)
class ByteMethod:
    """The built ``byte`` method: its parameters over the ensemble's members."""

    context: MethodContext
    beam: int
    gate: float | None

    def mixer(self, window: int | None = None) -> ByteMixer:
        """Fresh beams for every member, before the first byte of a text (``window``: longest token
        sequence each member reads; default its maximum positions)."""
        return ByteMixer(self.context, self.beam, self.gate, window)
