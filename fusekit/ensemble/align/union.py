"""The union vocabulary: every token of every member, keyed by the bytes it spells.

Each member's distribution is moved onto the union (a token the member lacks gets 0 from it) and
the weighted sum is a distribution over the union. With identical tokenizers the union is the
vocabulary itself and this is ``prob_avg``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusekit.ensemble.members import EOS_KEY, TokenVocab, utf8_mask


class UnionVocab:
    """Union of several :class:`TokenVocab` by key; ``maps[i][id]`` is the union index of member
    ``i``'s token ``id`` (unused ids point at a final sink slot that is dropped)."""

    def __init__(self, vocabs: Sequence[TokenVocab]) -> None:
        self.keys: list[bytes | str] = []
        self.index: dict[bytes | str, int] = {}
        for vocab in vocabs:
            for key in vocab.keys:
                if key is not None and key not in self.index:
                    self.index[key] = len(self.keys)
                    self.keys.append(key)
        self.size = len(self.keys)
        self.maps = [torch.tensor([self.size if k is None else self.index[k] for k in v.keys],
                                  dtype=torch.long) for v in vocabs]
        self.eos = torch.tensor([k == EOS_KEY for k in self.keys], dtype=torch.bool)
        self._allowed: dict[bytes, torch.Tensor] = {}

    def allowed(self, pending: bytes) -> torch.Tensor:
        """``(U,)`` keys that may follow ``pending`` bytes of an unfinished character (valid UTF-8;
        end-of-sequence only on a character boundary); cached per ``pending``."""
        mask = self._allowed.get(pending)
        if mask is None:
            mask = utf8_mask(self.keys, pending) | (self.eos & (not pending))
            self._allowed[pending] = mask
        return mask

    def mix(self, probs: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        """``(U,)`` union distribution ``Σ_i w_i p_i`` from each member's ``(V_i,)`` probabilities."""
        out = torch.zeros(self.size + 1, dtype=torch.float64)
        for p, w, index in zip(probs, weights, self.maps, strict=True):
            if w > 0:
                out.index_add_(0, index, p.detach().double().cpu() * w)
        return out[:-1]

    def restricted(self, member_probs: Sequence[torch.Tensor], weights: Sequence[float], top_k: int,
                   present: Sequence[int] | None = None) -> torch.Tensor:
        """Top-k union (UniTE-style): candidates are the union of each member's ``top_k`` tokens;
        each member's probabilities are renormalised over the candidates it spells, then mixed.
        Returns a ``(U,)`` distribution that is zero off the candidates. ``present``: members
        taking part (default all)."""
        members = list(range(len(member_probs))) if present is None else list(present)
        candidates = torch.zeros(self.size + 1, dtype=torch.bool)
        for i in members:
            p = member_probs[i]
            candidates[self.maps[i][p.topk(min(top_k, p.shape[-1])).indices.cpu()]] = True
        candidates[-1] = False
        out = torch.zeros(self.size + 1, dtype=torch.float64)
        total_w = 0.0
        for i in members:
            own = torch.zeros(self.size + 1, dtype=torch.float64)
            own.index_add_(0, self.maps[i], member_probs[i].detach().double().cpu())
            own = torch.where(candidates, own, torch.zeros((), dtype=torch.float64))
            mass = float(own.sum())
            if weights[i] > 0 and mass > 0:
                out += weights[i] * own / mass
                total_w += weights[i]
        return out[:-1] / total_w if total_w > 0 else out[:-1]

