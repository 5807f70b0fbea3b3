"""Bits per byte of a text under an ensemble, with the convention of :mod:`fusekit.lm.score`.

The text is tokenised by the primary; its first token is scored after the primary's start token
(BOS, else EOS; with neither it is charged ``ln(vocab)``), and long texts use the same sliding
windows as :func:`fusekit.lm.score.score_text`, so an ensemble of a model with itself scores
exactly as the model does. At every position the method's distribution is a proper distribution
over the next token (the primary's vocabulary, or the union of the vocabularies for ``union``),
and the text pays ``-log p`` of the primary's next token. Members with a different tokenizer follow
the text through :class:`~fusekit.ensemble.members.TextStream`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import torch

from fusekit.ensemble import combine
from fusekit.ensemble.base import CrossMethod, TokenMethod
from fusekit.ensemble.cascade import CascadeStats
from fusekit.ensemble.engine import Ensemble
from fusekit.ensemble.members import Member, TextStream, longest_complete_prefix
from fusekit.errors import FusekitError
from fusekit.lm.score import TextScore, encode, resolve_window, score_text, sliding_windows
from fusekit.progress import bar, label


@dataclass
class EnsembleScore:
    """The ensemble's score of one text, each member's own score, and method statistics."""

    ensemble: TextScore
    members: list[TextScore]
    details: dict[str, Any] = field(default_factory=dict)


def _window_logprobs(member: Member, ids: list[int]) -> torch.Tensor:
    """``(len(ids) - 1, vocab)`` log-probabilities of each next token within one window."""
    tensor = torch.tensor([ids], device=member.lm.device)
    with torch.inference_mode():
        logits = member.lm.model(input_ids=tensor, use_cache=False).logits[0, :-1]
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def score_ensemble(ens: Ensemble, text: str, *, context: int | None = None, stride: int | None = None,
                   members: bool = True) -> EnsembleScore:
    """Score ``text`` with the ensemble and (``members=True``) each member alone.

    Args:
        ens: a loaded ensemble whose method gives a full distribution.
        text: the text; bits per byte are over its UTF-8 bytes.
        context: longest window in tokens (default: the primary's, capped at 1024, and no longer
            than any same-tokenizer member's context).
        stride: how far each further window moves (default ``context // 2``).
        members: also score each member alone, with the same window where it fits.

    Returns:
        The ensemble's :class:`~fusekit.lm.score.TextScore`, each member's, and method statistics
        (``positions``, ``escalation_rate``, ``ensembled_share``, ``abstained`` where they apply).

    Raises:
        FusekitError: empty text, a method without token probabilities (``topk_union``, ``vote``,
            ``mbr``), or a primary tokenizer that does not spell the text byte for byte.

    Example:
        >>> ens = load_ensemble("configs/ensemble/prob_avg.yaml")  # doctest: +SKIP
        >>> score_ensemble(ens, "def f(x):\\n    return x\\n").ensemble.bits_per_byte  # doctest: +SKIP
    """
    if not text:
        raise FusekitError("the text is empty; there is nothing to score")
    if not ens.spec.distribution:
        raise FusekitError(f"method {ens.method} picks tokens or answers without a full distribution, so it "
                           "has no bits per byte; score the same models with method: union or prob_avg")
    if ens.spec.family == "byte":
        return _score_bytes(ens, text, context)
    primary = ens.primary_member
    same = [m for m in ens.members if m.vocab.fingerprint == primary.vocab.fingerprint]
    others = [m for m in ens.members if m.vocab.fingerprint != primary.vocab.fingerprint]
    context, stride = resolve_window(primary.lm, context, stride)
    context = min([context, *(m.context() for m in same)])
    stride = min(stride, context - 1)
    asked = (context, stride)
    ids = encode(primary.lm, text)
    data = text.encode("utf-8")
    pieces = [primary.vocab.pieces[i] if i < primary.vocab.width else None for i in ids]
    if others and b"".join(p or b"" for p in pieces) != data:
        raise FusekitError(f"the primary '{primary.ref}' tokenizer does not spell the text byte for byte "
                           "(it normalises it), so other tokenizers cannot follow it; choose another primary")
    width = min(m.vocab.width for m in same)
    seq, offsets, first_cost = _sequence(primary.vocab.start_id, ids, pieces, width)
    scorer = _Scorer(ens, same, others, data, width)
    nll = first_cost
    cursor = 1  # windows score positions 1, 2, ... of seq in order, each exactly once
    windows = sliding_windows(0, seq, context, stride)
    for window in bar(windows, desc=f"scoring {len(data):,} bytes with the {ens.method} ensemble",
                      unit="window"):
        start = cursor - window.first  # index in seq of the window's first token
        nll += scorer.window(window.ids, window.first, offsets[start:start + len(window.ids)])
        cursor += len(window.ids) - window.first
    result = EnsembleScore(TextScore(len(data), len(ids), nll), [], scorer.details())
    if members:
        result.members = [_member_score(m, text, *asked, index=i, count=len(ens.members))
                          for i, m in enumerate(ens.members)]
    return result


def _score_bytes(ens: Ensemble, text: str, context: int | None) -> EnsembleScore:
    """``method: byte``: scored byte by byte (:mod:`fusekit.ensemble.bytes`), members alike."""
    from fusekit.ensemble.bytes.method import ByteMethod
    from fusekit.ensemble.bytes.score import score_byte_ensemble

    return score_byte_ensemble(ens, text, cast(ByteMethod, ens.method_impl), context=context)


def _sequence(start: int | None, ids: list[int], pieces: list[bytes | None],
              width: int) -> tuple[list[int], list[int], float]:
    """The scored sequence (the start token, if any, then ``ids``), the byte offset of the text before
    each of its tokens, and the cost of the first token (``ln(width)`` when there is no start token)."""
    if start is not None:
        seq, first_cost = [start, *ids], 0.0
    else:
        seq, first_cost = ids, math.log(width)
    offsets = [0]  # byte offset of the text before seq[j]
    if start is not None:
        offsets.append(0)
    for p in (pieces if start is not None else pieces[:-1]):
        offsets.append(offsets[-1] + len(p or b""))
    return seq, offsets, first_cost


class _Scorer:
    """Scores windows of one text with the ensemble's method; keeps the method's statistics (it has
    the :class:`~fusekit.ensemble.base.Counters` fields)."""

    def __init__(self, ens: Ensemble, same: list[Member], others: list[Member], data: bytes,
                 width: int) -> None:
        self.ens, self.same, self.others, self.data, self.width = ens, same, others, data, width
        self.streams = {m.index: TextStream(m) for m in others}
        self.cascade: CascadeStats | None = None
        self.positions = 0
        self.gated_steps = 0
        self.ensembled_steps = 0
        self.abstained = 0

    def details(self) -> dict[str, Any]:
        out: dict[str, Any] = {"positions": self.positions}
        if self.cascade is not None:
            out["escalation_rate"] = round(self.cascade.escalation_rate, 4)
            out["answered_by"] = self.cascade.answered
        if getattr(self.ens.params, "gate", None) is not None:
            out["ensembled_share"] = round(self.ensembled_steps / max(1, self.positions), 4)
        if self.others:
            out["abstained"] = self.abstained  # member-positions a tokenizer could not follow
        return out

    def window(self, ids: list[int], first: int, offsets: list[int]) -> float:
        """Summed NLL of the scored tokens of one window; ``offsets[j]``: bytes before ``ids[j]``."""
        ens = self.ens
        lps = {m.index: _window_logprobs(m, ids)[:, :self.width] for m in self.same}
        rows = range(first - 1, len(ids) - 1)  # row r predicts ids[r + 1]
        targets = torch.tensor([ids[r + 1] for r in rows])
        idx = torch.tensor(list(rows))
        self.positions += len(idx)
        if ens.spec.family == "same":
            method = cast(TokenMethod, ens.method_impl)
            stacked = torch.stack([lps[m.index][idx] for m in ens.members])
            final = method.score(stacked, torch.tensor(ens.weights), ens.primary, self)
            return float(-final.gather(-1, targets[:, None]).double().sum())
        return self._cross(lps, idx, targets, [offsets[r + 1] for r in rows])

    def _cross(self, lps: dict[int, torch.Tensor], idx: torch.Tensor, targets: torch.Tensor,
               offsets: list[int]) -> float:
        """Different vocabularies: gated positions pay the primary's price, the others go to the method
        with every member's probabilities (a member abstains where its tokenizer cannot follow)."""
        method = cast(CrossMethod, self.ens.method_impl)
        primary_lp = lps[self.ens.primary][idx]
        total = 0.0
        rows: list[dict[int, torch.Tensor]] = []
        row_targets: list[int] = []
        for k, offset in enumerate(offsets):
            target = int(targets[k])
            if method.gate is not None:
                self.gated_steps += 1
                if bool(combine.confident(primary_lp[k], method.gate)):
                    total -= float(primary_lp[k, target])
                    continue
                self.ensembled_steps += 1
            prefix = self.data[:offset]
            cut = longest_complete_prefix(prefix)
            text, pending = prefix[:cut].decode("utf-8"), prefix[cut:]
            probs = {m.index: lps[m.index][int(idx[k])].exp() for m in self.same}
            for m in self.others:
                stream = self.streams[m.index]
                if stream.set_text(text, pending):
                    probs[m.index] = stream.logprobs().exp().cpu()
                else:
                    self.abstained += 1
            rows.append(probs)
            row_targets.append(target)
        if rows:
            total -= method.score_rows(rows, row_targets)
        return total


def _member_score(member: Member, text: str, context: int | None, stride: int | None, *, index: int = 0,
                  count: int = 1) -> TextScore:
    """The member alone, with the ensemble's window where it fits the member's context."""
    limit = member.context()
    if context is not None and context > limit:
        context = limit
    if context is not None and stride is not None:
        stride = min(stride, context - 1)
    return score_text(member.lm, text, context=context, stride=stride,
                      desc=f"scoring with member {index + 1}/{count} alone: {label(member.ref)}")
