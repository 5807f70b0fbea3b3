"""One tokenized model as a model over bytes: a beam of covering tokenizations.

After the bytes ``x[:n]``, each hypothesis is a token sequence that spells ``x[:m]`` exactly for some
``m <= n`` (with its log-probability and its own KV cache) and whose next token may still cover
``x[m:n]``. The probability that the text continues with byte ``b`` is the sum, over hypotheses, of
``P(h) · p(v | h)`` over the tokens ``v`` whose bytes start with ``x[m:n] + b``; the end symbol
(:data:`EOS`) gets ``P(h) · p(eos | h)`` from the hypotheses with ``m = n``. Normalised, this is
``P(x[:n] b ...) / P(x[:n] ...)``: with every hypothesis kept it is exact, so the product of a text's
byte probabilities is the total probability of all its tokenizations (covering the last byte), and
each step's distribution over 256 bytes and the end symbol sums to 1.

The model's next-token distribution is first renormalised over the tokens a text can contain (those
that spell bytes, and EOS): BOS, padding and unused ids are never part of a text.

The beam keeps, for each byte offset, the ``beam`` most probable tokenizations ending exactly there
(``beam = 1``: the best one, so some tokenization always ends at the last byte and every byte stays
possible); a tokenization stays while its last bytes are still the start of some token. The share of
``P(x[:n] ...)`` held by the tokenizations dropped is added up as ``pruned_nats``
(``Σ -log(1 - share)``), the measured cost of the beam.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch

from fusekit.ensemble.bytes.tables import ByteTable, byte_table
from fusekit.ensemble.members import TokenVocab
from fusekit.errors import FusekitError
from fusekit.lm.decode import cache_keyword
from fusekit.lm.load import LoadedLM

EOS = 256
"""Index of the end-of-text symbol in a byte distribution ``(257,)`` (bytes are 0..255)."""


@dataclass
class _Hyp:
    ids: list[int]  # tokens (the start token first)
    logp: float  # log-probability, less a constant shared by the whole beam
    end: int  # byte offset where its tokens end
    cache: Any = None
    cached: int = 0  # positions held in the cache
    probs: torch.Tensor | None = None  # (width,) float64 next-token probabilities over allowed tokens
    shares_cache: bool = False  # its cache is also its parent's or a sibling's: copy before extending it


class ByteBeam:
    """One model following a byte string, giving the distribution of the next byte.

    Args:
        lm: the model, loaded with its tokenizer.
        vocab: its :class:`~fusekit.ensemble.members.TokenVocab`.
        beam: tokenizations kept per byte offset where they end (>= 1).
        context: longest token sequence fed to the model; a hypothesis reaching it keeps its start
            token and its last ``context // 2`` tokens (default, and at most: the model's maximum
            positions).

    Attributes:
        forwards: tokens run through the model so far.
        pruned_nats: ``Σ -log(1 - dropped share)`` over the steps that dropped hypotheses.

    Raises:
        FusekitError: the tokenizer has neither BOS nor EOS (nothing to start the first token from).

    Example:
        >>> stream = ByteBeam(lm, vocab, beam=4)  # doctest: +SKIP
        >>> p = stream.distribution(); stream.advance(ord("d"))  # doctest: +SKIP
    """

    def __init__(self, lm: LoadedLM, vocab: TokenVocab, *, beam: int, context: int | None = None) -> None:
        if vocab.start_id is None:
            raise FusekitError(f"model '{lm.ref}' has neither a BOS nor an EOS token, so its first token has "
                               "no context; byte-level scoring needs one (add bos_token to its tokenizer)")
        if beam < 1:
            raise FusekitError(f"beam {beam}: must be at least 1")
        from fusekit.lm.score import max_context

        self.lm, self.vocab, self.beam = lm, vocab, beam
        self.table: ByteTable = byte_table(vocab)
        self.context = max(4, min(context or max_context(lm), max_context(lm)))
        self.data = bytearray()
        self.forwards = 0
        self.pruned_nats = 0.0
        self._keyword = cache_keyword(lm.model)
        start = _Hyp([vocab.start_id], 0.0, 0)
        self._run([start])
        self.hyps = [start]
        self._dist: torch.Tensor | None = None

    def distribution(self) -> torch.Tensor:
        """``(257,)`` float64 probabilities of the next byte (index :data:`EOS`: the text ends)."""
        if self._dist is None:
            t = self.table
            mass = torch.zeros(EOS + 1, dtype=torch.float64)
            top = max(h.logp for h in self.hyps)
            for h in self.hyps:
                assert h.probs is not None
                w = math.exp(h.logp - top)
                pending = bytes(self.data[h.end:])
                if not pending:
                    mass.index_add_(0, t.first, h.probs[t.text_ids] * w)
                    if t.eos_id is not None:
                        mass[EOS] += h.probs[t.eos_id] * w
                else:
                    ids, following = t.extend[pending]
                    mass.index_add_(0, following, h.probs[ids] * w)
            self._dist = mass / mass.sum()
        return self._dist

    def advance(self, byte: int) -> None:
        """Read one more byte of the text: keep, extend and prune the hypotheses.

        Raises:
            FusekitError: no tokenization of this model spells the bytes read so far.
        """
        self.data.append(byte)
        self._dist = None
        kept: list[tuple[float, _Hyp]] = []  # (contribution, hypothesis still inside a token)
        ended: list[tuple[float, _Hyp, int]] = []  # (log-probability, parent, token ending here)
        for h in self.hyps:
            assert h.probs is not None
            pending = bytes(self.data[h.end:])
            entry = self.table.extend.get(pending)
            if entry is not None:
                mass = float(h.probs[entry[0]].sum())
                if mass > 0:
                    kept.append((h.logp + math.log(mass), h))
            for v in self.table.exact.get(pending, ()):
                p = float(h.probs[v])
                if p > 0:
                    ended.append((h.logp + math.log(p), h, v))
        if not kept and not ended:
            raise FusekitError(f"model '{self.lm.ref}' cannot spell byte {byte:#04x} at offset "
                               f"{len(self.data) - 1} of the text (no token covers it); use a model whose "
                               "tokenizer has byte fallback")
        ended.sort(key=lambda e: -e[0])
        total = _logsumexp([s for s, _ in kept] + [s for s, _, _ in ended])
        if len(ended) > self.beam:
            dropped = _logsumexp([s for s, _, _ in ended[self.beam:]])
            self.pruned_nats -= math.log1p(-math.exp(dropped - total))
            ended = ended[:self.beam]
        for _, h in kept:
            h.logp -= total
        self.hyps = [h for _, h in kept] + self._children(ended, {id(h) for _, h in kept}, total)

    def _children(self, ended: list[tuple[float, _Hyp, int]], alive: set[int], total: float) -> list[_Hyp]:
        """The hypotheses whose last token ends at the current byte, run through the model (each starts
        from its parent's KV cache, copied only where it is extended in place and still needed)."""
        children: list[_Hyp] = []
        for k, (score, h, v) in enumerate(ended):
            shared = id(h) in alive or any(g is h for _, g, _ in ended[k + 1:])
            children.append(_Hyp([*h.ids, v], score - total, len(self.data), h.cache, h.cached,
                                 shares_cache=shared))
        self._run(children)
        return children

    def _run(self, hyps: list[_Hyp]) -> None:
        """Run each new hypothesis's unseen tokens through the model; set its next-token probabilities.
        Hypotheses that each add one token to a cache go through one batched forward pass."""
        for h in hyps:
            if len(h.ids) > self.context:
                h.ids = [h.ids[0], *h.ids[len(h.ids) - self.context // 2:]]
                h.cache, h.cached = None, 0
        single = [h for h in hyps if h.cache is not None and h.cached == len(h.ids) - 1]
        if len(single) < 2:
            single = []
        for h in hyps:
            if not any(h is g for g in single):
                self._forward_one(h)
        if single:
            self._forward_batch(single)

    def _forward_one(self, h: _Hyp) -> None:
        if h.shares_cache:  # the forward pass extends the cache in place
            h.cache, h.shares_cache = copy.deepcopy(h.cache), False
        new = torch.tensor([h.ids[h.cached:]], device=self.lm.device)
        positions = torch.arange(h.cached, len(h.ids), device=self.lm.device)[None]
        with torch.inference_mode():
            out = self.lm.model(input_ids=new, position_ids=positions, use_cache=True,
                                **{self._keyword: h.cache})
        self.forwards += new.shape[1]
        h.cache, h.cached = getattr(out, self._keyword), len(h.ids)
        self._set_probs(h, out.logits[0, -1])

    def _forward_batch(self, hyps: list[_Hyp]) -> None:
        """One forward pass for hypotheses of different lengths: caches left-padded to the longest
        (masked), each row at its own position; the new caches are cut back per row."""
        from transformers import DynamicCache

        device = self.lm.device
        longest = max(h.cached for h in hyps)
        padded = []
        for k in range(len(hyps[0].cache.layers)):
            keys, values = [], []
            for h in hyps:
                layer = h.cache.layers[k]
                pad = longest - h.cached
                keys.append(torch.nn.functional.pad(layer.keys, (0, 0, pad, 0)))
                values.append(torch.nn.functional.pad(layer.values, (0, 0, pad, 0)))
            padded.append((torch.cat(keys), torch.cat(values)))
        mask = torch.zeros(len(hyps), longest + 1, dtype=torch.long, device=device)
        for row, h in enumerate(hyps):
            mask[row, longest - h.cached:] = 1
        ids = torch.tensor([[h.ids[-1]] for h in hyps], device=device)
        positions = torch.tensor([[h.cached] for h in hyps], device=device)
        with torch.inference_mode():
            out = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                                **{self._keyword: DynamicCache(padded)})
        self.forwards += len(hyps)
        cache = getattr(out, self._keyword)
        for row, h in enumerate(hyps):
            start = longest - h.cached
            h.cache = DynamicCache([(layer.keys[row:row + 1, :, start:], layer.values[row:row + 1, :, start:])
                                    for layer in cache.layers])
            h.cached, h.shares_cache = len(h.ids), False
            self._set_probs(h, out.logits[row, -1])

    def _set_probs(self, h: _Hyp, logits: torch.Tensor) -> None:
        probs = torch.softmax(logits.double().cpu(), dim=-1)
        probs = torch.where(self.table.allowed, probs, torch.zeros((), dtype=torch.float64))
        h.probs = probs / probs.sum()


def _logsumexp(values: list[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))
