"""Drive an ensemble method with the one decoder of :mod:`fusekit.lm.decode`.

- One vocabulary (:func:`decode_ids`): the prompts are decoded as one left-padded batch; every
  member keeps a KV cache over it (:class:`~fusekit.lm.decode.CachedModel`) and catches up lazily,
  so a member the gate or the cascade does not need is not run.
- Different vocabularies (:func:`decode_text`): the members follow the text; each re-tokenises only
  its changed tail (:class:`~fusekit.ensemble.members.TextStream`), one prompt at a time.
- Whole answers (:func:`vote_answers`): every member (or several seeded samples of it) writes an
  answer through :func:`decode_ids`, and the method picks one.

Every token is chosen by :func:`fusekit.lm.decode.sample`, the sampler ``fusekit.lm.generate`` uses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from fusekit.ensemble import combine
from fusekit.ensemble.base import AnswerMethod, CrossMethod, TokenMethod
from fusekit.ensemble.members import Member, TextStream, logit_width, longest_complete_prefix, utf8_mask
from fusekit.ensemble.results import Answer, GenerationResult
from fusekit.errors import FusekitError
from fusekit.lm.decode import CachedModel, TokenBatch, decode_loop, sample

if TYPE_CHECKING:
    from fusekit.ensemble.engine import Ensemble
    from fusekit.ensemble.members import TokenVocab


class _Members:
    """The :class:`~fusekit.ensemble.base.MemberLogits` of members ``which`` over one batch."""

    def __init__(self, members: Sequence[Member], weights: Sequence[float], primary: int,
                 batch: TokenBatch) -> None:
        self.models = [CachedModel(m.lm.model, batch) for m in members]
        self.width = min(logit_width(m.lm) for m in members)
        w = torch.tensor(list(weights), dtype=torch.float32, device=batch.device)
        self._weights = w / w.sum()
        self._primary = primary

    @property
    def count(self) -> int:
        return len(self.models)

    @property
    def primary(self) -> int:
        return self._primary

    @property
    def weights(self) -> torch.Tensor:
        return self._weights

    def logits(self, i: int) -> torch.Tensor:
        return self.models[i].logits()[:, :self.width]

    def logprobs(self, i: int) -> torch.Tensor:
        return torch.log_softmax(self.logits(i), dim=-1)


def _prompt_ids(lead: Member, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's ids under ``lead``'s tokenizer after its start token (BOS, else EOS)."""
    seqs: list[list[int]] = []
    start = lead.vocab.start_id
    for prompt in prompts:
        ids = [int(i) for i in lead.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
        seqs.append(([start] if start is not None else []) + ids)
        if not seqs[-1]:
            raise FusekitError(f"prompt {prompt!r} gives no tokens under '{lead.ref}'")
    return seqs


def _check_context(members: Sequence[Member], seqs: Sequence[Sequence[int]], max_new: int) -> None:
    limit = min(m.context() for m in members)
    longest = max(len(s) for s in seqs)
    if longest + max_new > limit:
        raise FusekitError(f"a prompt of {longest} tokens plus --max-new-tokens {max_new} exceeds the "
                           f"context of {limit} positions; shorten the prompt or lower --max-new-tokens")


def decode_ids(ens: Ensemble, method: TokenMethod | None, which: Sequence[int], prompts: Sequence[str], *,
               max_new: int, temperature: float, generator: torch.Generator,
               result: GenerationResult) -> list[Answer]:
    """Batched decoding over one shared vocabulary with the members ``which``.

    Args:
        ens: the ensemble (members, primary, weights, ``stop_at_eos``).
        method: combines the members' logits; unused (may be None) when ``which`` is one member,
            which then decodes alone.
        which: indices of the members taking part.
        prompts: the prompts, decoded together.
        max_new: most new tokens per prompt.
        temperature: 0 for greedy, else the sampling temperature.
        generator: the sampler's random source.
        result: receives forwarded-token counts and the method's statistics.

    Returns:
        One answer per prompt.

    Raises:
        FusekitError: a prompt without tokens, or too long for a member's context.
    """
    lead = ens.members[which[0]] if len(which) == 1 else ens.primary_member
    seqs = _prompt_ids(lead, prompts)
    _check_context([ens.members[i] for i in which], seqs, max_new)
    tok: Any = lead.tokenizer
    pad = tok.pad_token_id if isinstance(tok.pad_token_id, int) else (lead.vocab.eos_id or 0)
    batch = TokenBatch(seqs, max_new, pad, lead.lm.device)
    primary = which.index(ens.primary) if ens.primary in which else 0
    members = _Members([ens.members[i] for i in which], [ens.weights[i] for i in which], primary, batch)
    if method is None or len(which) == 1:
        def step(done: list[bool]) -> torch.Tensor:
            return members.logits(0)
    else:
        def step(done: list[bool]) -> torch.Tensor:
            return method.step(members, done, result)
    eos = lead.vocab.eos_id if ens.recipe.generation.stop_at_eos else None
    produced = decode_loop(batch, step, max_new_tokens=max_new, temperature=temperature,
                           generator=generator, eos=eos)
    for i, model in zip(which, members.models, strict=True):
        result.forwarded_tokens[i] += model.forwarded
    return [Answer(prompt, tok.decode(out, skip_special_tokens=True), len(out),
                   bool(out) and eos is not None and out[-1] == eos)
            for prompt, out in zip(prompts, produced, strict=True)]


def decode_text(ens: Ensemble, method: CrossMethod, prompt: str, *, max_new: int, temperature: float,
                generator: torch.Generator, result: GenerationResult) -> Answer:
    """Decoding over different vocabularies: the text grows by the bytes of each chosen key.

    Args:
        ens: the ensemble.
        method: turns the members' distributions into scores over its keys.
        prompt: the prompt text.
        max_new: most steps (keys chosen).
        temperature: 0 for greedy, else the sampling temperature.
        generator: the sampler's random source.
        result: receives forwarded-token counts and gate statistics.

    Returns:
        The answer; ``new_tokens`` counts steps.

    Raises:
        FusekitError: the primary cannot continue inside a character (no single-byte tokens).
    """
    streams = [TextStream(m) for m in ens.members]
    buf = prompt.encode("utf-8")
    out = b""
    steps, finished = 0, False
    for _ in range(max_new):
        cut = longest_complete_prefix(buf)
        text, pending = buf[:cut].decode("utf-8"), buf[cut:]
        piece, is_eos = _next_piece(ens, method, streams, text, pending, temperature, generator, result)
        steps += 1
        if is_eos and ens.recipe.generation.stop_at_eos:
            finished = True
            break
        if piece is None:  # a special token other than end-of-sequence: nothing to spell
            continue
        buf += piece
        out += piece
    for i, s in enumerate(streams):
        result.forwarded_tokens[i] += s.forwarded_tokens
    return Answer(prompt, out.decode("utf-8", errors="replace"), steps, finished)


def _next_piece(ens: Ensemble, method: CrossMethod, streams: Sequence[TextStream], text: str, pending: bytes,
                temperature: float, generator: torch.Generator,
                result: GenerationResult) -> tuple[bytes | None, bool]:
    """One step of :func:`decode_text`: the bytes chosen next and whether they end the sequence."""
    primary = ens.primary_member
    if not streams[ens.primary].set_text(text, pending):
        raise FusekitError(f"the primary '{primary.ref}' has no single-byte tokens, so it cannot "
                           "continue inside a character; choose a byte-level primary")
    primary_lp = streams[ens.primary].logprobs()
    gate = method.gate
    result.gated_steps += gate is not None
    if gate is not None and bool(combine.confident(primary_lp, gate)):
        return _primary_piece(primary.vocab, primary_lp, pending, temperature, generator)
    result.ensembled_steps += gate is not None
    present = [i == ens.primary or s.set_text(text, pending) for i, s in enumerate(streams)]
    probs = {i: s.logprobs().exp().cpu() for i, s in enumerate(streams) if present[i]}
    scores = method.scores(probs, ens.context.renormalised(list(probs)), pending)
    return method.spell(int(sample(scores[None], temperature, generator)[0]))


def _primary_piece(vocab: TokenVocab, logprobs: torch.Tensor, pending: bytes, temperature: float,
                   generator: torch.Generator) -> tuple[bytes | None, bool]:
    """The primary's own choice among tokens that keep the text valid UTF-8."""
    allowed = utf8_mask(vocab.keys, pending).clone().to(logprobs.device)
    if vocab.eos_id is not None and not pending:
        allowed[vocab.eos_id] = True
    token = int(sample(logprobs.masked_fill(~allowed, float("-inf"))[None], temperature, generator)[0])
    return vocab.pieces[token], token == vocab.eos_id


def vote_answers(ens: Ensemble, method: AnswerMethod, prompts: Sequence[str], *, max_new: int,
                 temperature: float, seed: int, result: GenerationResult) -> list[Answer]:
    """Every member writes ``method.samples`` answers (seeds ``seed``, ``seed + 1``, ...) to each
    prompt and ``method`` picks one; it keeps the chosen answer's token count and end-of-sequence.

    Args:
        ens: the ensemble.
        method: picks one answer among the candidates.
        prompts: the prompts.
        max_new: most new tokens per answer.
        temperature: 0 for greedy, else the sampling temperature.
        seed: the first sample's seed.
        result: receives forwarded-token counts.

    Returns:
        One answer per prompt, with every candidate's text.
    """
    answers = []
    for prompt in prompts:
        candidates: list[Answer] = []
        weights: list[float] = []
        for m in ens.members:
            for s in range(method.samples):
                generator = torch.Generator().manual_seed(seed + s)
                candidates += decode_ids(ens, None, [m.index], [prompt], max_new=max_new,
                                         temperature=temperature, generator=generator, result=result)
                weights.append(ens.weights[m.index] / method.samples)
        texts = [c.text for c in candidates]
        best = candidates[method.pick(texts, weights)]
        answers.append(Answer(prompt, best.text, best.new_tokens, best.finished, texts))
    return answers
