"""Methods over different vocabularies: ``union``, ``topk_union`` (over the union of the spellings)
and ``relative`` (mapped onto the primary's vocabulary through relative representations). Each is a
small object with the :class:`~fusekit.ensemble.base.CrossMethod` protocol."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fusekit.ensemble.align import RelativeAligner, UnionVocab
from fusekit.ensemble.base import MethodContext
from fusekit.ensemble.members import EOS_KEY, utf8_mask
from fusekit.errors import FusekitError


@dataclass
class UnionMethod:
    """The weighted mixture over the union vocabulary (``top_k`` None), or its top-k form: candidates
    are each member's ``top_k`` tokens, each member renormalised over them (UniTE-style).

    Attributes:
        context: the members, primary and weights.
        union: the union vocabulary of every member.
        gate: see :attr:`fusekit.ensemble.base.CrossMethod.gate`.
        top_k: tokens each member proposes; None for the full union.
    """

    context: MethodContext
    union: UnionVocab
    gate: float | None = None
    top_k: int | None = None

    def scores(self, probs: dict[int, torch.Tensor], weights: dict[int, float],
               pending: bytes) -> torch.Tensor:
        """See :meth:`fusekit.ensemble.base.CrossMethod.scores`; keys are the union's."""
        members = self.context.members
        all_probs = [probs.get(i, torch.zeros(m.vocab.width)) for i, m in enumerate(members)]
        all_weights = [weights.get(i, 0.0) for i in range(len(members))]
        if self.top_k is None:
            dist = self.union.mix(all_probs, all_weights)
        else:
            dist = self.union.restricted(all_probs, all_weights, self.top_k, present=list(probs))
        allowed = self.union.allowed(pending)
        return torch.where(allowed, dist, torch.zeros((), dtype=dist.dtype)).log()

    def spell(self, key: int) -> tuple[bytes | None, bool]:
        """See :meth:`fusekit.ensemble.base.CrossMethod.spell`."""
        value = self.union.keys[key]
        return (value, False) if isinstance(value, bytes) else (None, value == EOS_KEY)

    def score_rows(self, rows: Sequence[dict[int, torch.Tensor]], targets: Sequence[int]) -> float:
        """See :meth:`fusekit.ensemble.base.CrossMethod.score_rows`: ``log Σ_i w_i p_i(target)``, each
        member's probability of the token spelling the target's bytes (0 where it has none)."""
        if self.top_k is not None:
            raise FusekitError("method topk_union picks tokens without a full distribution, so it has no "
                               "bits per byte; score the same models with method: union")
        members = self.context.members
        primary = members[self.context.primary].vocab
        total = 0.0
        for probs, target in zip(rows, targets, strict=True):
            piece = primary.pieces[target] or b""
            p = 0.0
            for i, w in self.context.renormalised(list(probs)).items():
                vocab = members[i].vocab
                token = target if vocab.fingerprint == primary.fingerprint else vocab.by_bytes.get(piece)
                p += w * (float(probs[i][token]) if token is not None else 0.0)
            total += math.log(max(p, 1e-300))
        return total


@dataclass
class RelativeMethod:
    """Relative representations (DeePEn-style): every member's distribution mapped onto the primary's
    vocabulary through shared anchor tokens, then optionally refined (see
    :mod:`fusekit.ensemble.align.relative`).

    Attributes:
        context: the members, primary and weights.
        aligner: the relative tables and maps back to the primary.
        gate: see :attr:`fusekit.ensemble.base.CrossMethod.gate`.
        steps, learning_rate, candidates: refinement settings of
            :meth:`~fusekit.ensemble.align.relative.RelativeAligner.aggregate`.
    """

    context: MethodContext
    aligner: RelativeAligner
    gate: float | None = None
    steps: int = 0
    learning_rate: float = 0.15
    candidates: int = 64

    def _aggregate(self, probs: dict[int, torch.Tensor], weights: dict[int, float]) -> torch.Tensor:
        return self.aligner.aggregate(probs, weights, steps=self.steps, learning_rate=self.learning_rate,
                                      candidates=self.candidates)

    def scores(self, probs: dict[int, torch.Tensor], weights: dict[int, float],
               pending: bytes) -> torch.Tensor:
        """See :meth:`fusekit.ensemble.base.CrossMethod.scores`; keys are the primary's token ids."""
        vocab = self.context.members[self.context.primary].vocab
        allowed = utf8_mask(vocab.keys, pending).clone()
        if vocab.eos_id is not None and not pending:
            allowed[vocab.eos_id] = True
        return self._aggregate(probs, weights).masked_fill(~allowed, float("-inf"))

    def spell(self, key: int) -> tuple[bytes | None, bool]:
        """See :meth:`fusekit.ensemble.base.CrossMethod.spell`."""
        vocab = self.context.members[self.context.primary].vocab
        return vocab.pieces[key], key == vocab.eos_id

    def score_rows(self, rows: Sequence[dict[int, torch.Tensor]], targets: Sequence[int]) -> float:
        """See :meth:`fusekit.ensemble.base.CrossMethod.score_rows`; positions are batched by which
        members took part (a member abstains where its tokenizer cannot follow)."""
        groups: dict[tuple[int, ...], list[int]] = {}
        for k, row in enumerate(rows):
            groups.setdefault(tuple(sorted(row)), []).append(k)
        total = 0.0
        for present, ks in groups.items():
            probs = {i: torch.stack([rows[k][i] for k in ks]) for i in present}
            logp = self._aggregate(probs, self.context.renormalised(present))
            total += float(logp.gather(-1, torch.tensor([targets[k] for k in ks])[:, None]).double().sum())
        return total
