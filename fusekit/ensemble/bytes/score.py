"""Bits per byte at the byte level: one model (``fusekit score --bytes``) or a ``byte`` ensemble.

The text pays ``-log p(b | bytes before)`` for each of its bytes under the beam's next-byte
distribution; no end symbol is charged, as token-level scores charge none. With an unpruned beam the
total is ``-log`` of the probability of all the model's tokenizations covering the text, which is
at most the token-level score of its one canonical tokenization.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fusekit.ensemble.base import MethodContext
from fusekit.ensemble.bytes.method import ByteMethod, ByteMixer
from fusekit.ensemble.members import Member, logit_width, token_vocab
from fusekit.errors import FusekitError
from fusekit.lm.load import LoadedLM
from fusekit.lm.score import TextScore
from fusekit.progress import steps

if TYPE_CHECKING:
    from fusekit.ensemble.engine import Ensemble
    from fusekit.ensemble.scoring import EnsembleScore

DEFAULT_BEAM = 2
"""Tokenizations each model keeps when none is asked for."""


@dataclass
class ByteScore:
    """A model's byte-level score of one text.

    Attributes:
        score: ``n_bytes``, ``nll_nats``; ``n_tokens`` counts bytes, so ``perplexity`` is per byte.
        beam: tokenizations kept.
        pruned_nats: mass the beam dropped (see :class:`~fusekit.ensemble.bytes.beam.ByteBeam`).
        forwards: tokens run through the model.
    """

    score: TextScore
    beam: int
    pruned_nats: float
    forwards: int
    details: dict[str, Any] = field(default_factory=dict)


def _run(mixer: ByteMixer, data: bytes, desc: str) -> tuple[float, list[float]]:
    """Summed NLL (nats) of ``data`` under the mixture and under each member alone."""
    total, alone = 0.0, [0.0] * len(mixer.beams)
    with steps(desc, total=len(data), unit="B") as advance:
        for byte in data:
            members = mixer.members()
            for i, p in enumerate(members):
                if float(p[byte]) <= 0:  # the member's advance() below names the byte it cannot spell
                    mixer.beams[i].advance(byte)
                alone[i] -= math.log(float(p[byte]))
            total -= math.log(float(mixer.distribution(members)[byte]))
            mixer.advance(byte)
            advance(1)
    return total, alone


def score_bytes(lm: LoadedLM, text: str, *, beam: int = DEFAULT_BEAM) -> ByteScore:
    """Bits per byte of ``text`` under ``lm`` read as a model over bytes.

    Args:
        lm: a model loaded with its tokenizer.
        text: the text (non-empty); its UTF-8 bytes are scored.
        beam: tokenizations kept at once (more: closer to the exact marginal, slower).

    Returns:
        The :class:`ByteScore`.

    Raises:
        FusekitError: empty text, no tokenizer, a tokenizer without BOS/EOS, beam < 1, or a text the
            tokenizer cannot spell.

    Example:
        >>> lm = load_lm("demo-out/experts/python")  # doctest: +SKIP
        >>> score_bytes(lm, "def f(x):\\n").score.bits_per_byte  # doctest: +SKIP
    """
    if not text:
        raise FusekitError("the text is empty; there is nothing to score")
    if lm.tokenizer is None:
        raise FusekitError(f"model '{lm.ref}' was loaded without a tokenizer; scoring text needs one")
    member = Member(0, lm.ref, lm, 1.0, token_vocab(lm.tokenizer, logit_width(lm)))
    mixer = ByteMixer(MethodContext([member], 0, [1.0]), beam, None)
    data = text.encode("utf-8")
    nll, _ = _run(mixer, data, f"scoring {len(data)} bytes with {lm.ref} (beam {beam})")
    stream = mixer.beams[0]
    return ByteScore(TextScore(len(data), len(data), nll), beam, stream.pruned_nats, stream.forwards)


def score_byte_ensemble(ens: Ensemble, text: str, method: ByteMethod, *,
                        context: int | None = None) -> EnsembleScore:
    """The ``byte`` method's score of ``text``, with each member's byte-level score from the same pass.

    ``context`` caps the tokens each member reads (default: its maximum positions); a tokenization
    reaching it keeps its last half.

    Members' rows (``members``) are their byte-level scores at the same beam; ``details`` gives the
    beam, each member's pruned mass and forwarded tokens, and ``ensembled_share`` with a gate.
    """
    from fusekit.ensemble.scoring import EnsembleScore

    if not text:
        raise FusekitError("the text is empty; there is nothing to score")
    data = text.encode("utf-8")
    if context is not None and context < 2:
        raise FusekitError(f"--context {context}: a window needs at least 2 tokens")
    mixer = method.mixer(context)
    nll, alone = _run(mixer, data, f"scoring {len(data)} bytes with a byte ensemble (beam {method.beam})")
    members = [TextScore(len(data), len(data), n) for n in alone]
    details: dict[str, Any] = {"positions": len(data), "beam": method.beam,
                               "pruned_nats": [round(p, 4) for p in mixer.pruned_nats],
                               "forwarded_tokens": [b.forwards for b in mixer.beams]}
    if method.gate is not None:
        details["ensembled_share"] = round(mixer.ensembled_steps / max(1, len(data)), 4)
    return EnsembleScore(TextScore(len(data), len(data), nll), members, details)
