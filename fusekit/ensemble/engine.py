"""Load an ensemble and generate with it.

Same-vocabulary methods (``prob_avg``, ``logit_avg``, ``cascade``) decode a whole batch at once:
every member keeps a KV cache over the left-padded batch and catches up lazily, so a member the
gate or the cascade does not need is not run. Cross-vocabulary methods (``union``, ``topk_union``,
``relative``) follow the text: each member re-tokenises only the changed tail of it
(:class:`~fusekit.ensemble.members.TextStream`) and prompts are decoded one after another.
``vote`` and ``mbr`` let every member (or several seeded samples of it) write a whole answer.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusekit.cache import cache_folder
from fusekit.ensemble import combine
from fusekit.ensemble.align import RelativeAligner, UnionVocab
from fusekit.ensemble.cascade import CascadeStats, cascade_step
from fusekit.ensemble.members import (
    EOS_KEY,
    Member,
    TextStream,
    cache_kwargs,
    logit_width,
    longest_complete_prefix,
    token_vocab,
    utf8_mask,
)
from fusekit.ensemble.recipe import (
    ANSWER_METHODS,
    CROSS_VOCAB_METHODS,
    SAME_VOCAB_METHODS,
    EnsembleRecipe,
    load_ensemble_recipe,
)
from fusekit.ensemble.vote import majority, mbr
from fusekit.errors import FusekitError, RecipeError
from fusekit.recipe.load import RecipeSource


@dataclass
class Answer:
    """One generated answer."""

    prompt: str
    text: str
    new_tokens: int
    finished: bool  # stopped at end-of-sequence
    candidates: list[str] | None = None  # vote/mbr: every member's answer


@dataclass
class GenerationResult:
    answers: list[Answer]
    seconds: float
    forwarded_tokens: list[int]  # per member: tokens run through it
    cascade: CascadeStats | None = None
    ensembled_steps: int = 0  # steps where the gate let the whole ensemble decide
    gated_steps: int = 0  # steps the gate was asked about

    @property
    def new_tokens(self) -> int:
        return sum(a.new_tokens for a in self.answers)

    def summary(self) -> dict[str, Any]:
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


def _same_tokenizer_problem(members: Sequence[Member], primary: int) -> tuple[int, float] | None:
    base = members[primary].vocab
    for m in members:
        if m.vocab.fingerprint != base.fingerprint:
            shared = len(set(m.vocab.by_bytes) & set(base.by_bytes))
            return m.index, shared / max(1, len(set(m.vocab.by_bytes) | set(base.by_bytes)))
    return None


class Ensemble:
    """Loaded members plus the recipe's method; see :func:`load_ensemble`."""

    def __init__(self, recipe: EnsembleRecipe, members: list[Member], *, source: RecipeSource | None = None,
                 weights: Sequence[float] | None = None) -> None:
        self.recipe = recipe
        self.members = members
        self.method = recipe.method
        self.primary = recipe.primary
        self.params = recipe.params()
        self.weights = list(weights) if weights is not None else recipe.weights()
        self.source = source
        problem = _same_tokenizer_problem(members, self.primary)
        self.same_tokenizer = problem is None
        if self.method in SAME_VOCAB_METHODS and problem is not None:
            i, share = problem
            where = source.where(("models", i, "model")) + " " if source else ""
            raise RecipeError(
                f"{where}models[{i}].model: '{members[i].ref}' has a different "
                f"tokenizer from the primary '{members[self.primary].ref}' ({share:.0%} of token spellings "
                f"shared); method {self.method} needs one vocabulary; use method: union or relative")
        self._union: UnionVocab | None = None
        self._relative: RelativeAligner | None = None
        if self.method in ("union", "topk_union"):
            self._union = UnionVocab([m.vocab for m in members])
        if self.method == "relative":
            self._relative = self._build_relative()

    # --- set-up -------------------------------------------------------------------------------

    def _build_relative(self) -> RelativeAligner:
        from fusekit.sizes import parse_size

        p = self.params
        cache = Path(p.cache_dir).expanduser() if p.cache_dir else _default_cache_dir()
        return RelativeAligner(
            [m.vocab for m in self.members],
            [_embeddings(m, p.embeddings) for m in self.members],
            primary=self.primary, max_anchors=p.max_anchors,
            max_table_bytes=parse_size(p.max_table_memory, "parameters.max_table_memory"),
            sparsify=p.sparsify, sparse_k=p.sparse_k, cache_dir=cache, neighbours=p.neighbours,
            temperature=p.temperature)

    @property
    def primary_member(self) -> Member:
        return self.members[self.primary]

    # --- generation ---------------------------------------------------------------------------

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int | None = None,
                 batch_size: int = 8) -> GenerationResult:
        """Continue each prompt; options default to the recipe's ``generation`` block.

        Raises:
            FusekitError: no prompts, an empty prompt, or a prompt too long for a member's context.
        """
        gen = self.recipe.generation
        max_new = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        temp = gen.temperature if temperature is None else temperature
        seed = gen.seed if seed is None else seed
        if not prompts:
            raise FusekitError("no prompts were given; pass --prompt TEXT or a --prompts file with lines")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise FusekitError(f"prompt {i} is empty; every prompt needs some text")
        if max_new < 1:
            raise FusekitError(f"--max-new-tokens {max_new}: must be at least 1")
        if temp < 0:
            raise FusekitError(f"--temperature {temp}: must be 0 (greedy) or more")
        generator = torch.Generator().manual_seed(seed)
        started = time.perf_counter()
        result = GenerationResult([], 0.0, [0] * len(self.members))
        if self.method == "cascade":
            result.cascade = CascadeStats([0] * len(self.members))
        if self.method in ANSWER_METHODS:
            self._vote(prompts, max_new, temp, seed, result)
        elif self.method in CROSS_VOCAB_METHODS:
            for prompt in prompts:
                result.answers.append(self._generate_text(prompt, max_new, temp, generator, result))
        else:
            for lo in range(0, len(prompts), max(1, batch_size)):
                result.answers += self._generate_ids(list(range(len(self.members))), self.weights,
                                                     prompts[lo:lo + batch_size], max_new, temp, generator,
                                                     result)
        result.seconds = time.perf_counter() - started
        return result

    def _generate_ids(self, which: list[int], weights: Sequence[float], prompts: Sequence[str], max_new: int,
                      temperature: float, generator: torch.Generator, result: GenerationResult,
                      method: str | None = None) -> list[Answer]:
        """Batched decoding over one shared vocabulary with the members ``which``."""
        method = method or self.method
        lead = self.members[which[0]] if len(which) == 1 else self.primary_member
        tok = lead.tokenizer
        seqs: list[list[int]] = []
        for prompt in prompts:
            prompt_ids = [int(i) for i in tok(prompt, add_special_tokens=False)["input_ids"]]
            start = lead.vocab.start_id
            seqs.append(([start] if start is not None else []) + prompt_ids)
            if not seqs[-1]:
                raise FusekitError(f"prompt {prompt!r} gives no tokens under '{lead.ref}'")
        limit = min(self.members[i].context() for i in which)
        longest = max(len(s) for s in seqs)
        if longest + max_new > limit:
            raise FusekitError(f"a prompt of {longest} tokens plus --max-new-tokens {max_new} exceeds the "
                               f"context of {limit} positions; shorten the prompt or lower --max-new-tokens")
        pad = tok.pad_token_id if isinstance(tok.pad_token_id, int) else (lead.vocab.eos_id or 0)
        batch = _IdBatch(seqs, max_new, pad, lead.lm.device)
        states = {i: _IdState(self.members[i], batch) for i in which}
        width = min(logit_width(self.members[i].lm) for i in which)
        w = torch.tensor([weights[i] for i in which], dtype=torch.float32, device=batch.device)
        w = w / w.sum()
        eos = lead.vocab.eos_id if self.recipe.generation.stop_at_eos else None
        done = [False] * len(seqs)
        produced: list[list[int]] = [[] for _ in seqs]
        gate = getattr(self.params, "gate", None) if method in ("prob_avg", "logit_avg") else None
        log_gate = math.log(gate) if gate is not None else 0.0
        first = which.index(self.primary) if self.primary in which else 0

        def logits(i: int) -> torch.Tensor:
            return states[which[i]].logits()[:, :width]

        def lp(i: int) -> torch.Tensor:
            return torch.log_softmax(logits(i), dim=-1)

        with torch.inference_mode():  # one context for the whole loop: no per-step set-up
            for _ in range(max_new):
                step: torch.Tensor  # scores whose argmax / softmax(· / T) is the next token
                if len(which) == 1:
                    step = logits(0)
                elif method == "cascade":
                    step, chosen = cascade_step(lp, len(which), self.params.threshold)
                    assert result.cascade is not None
                    result.cascade.add(chosen[torch.tensor(done, device=chosen.device).logical_not()])
                else:
                    need: list[bool] | None = None
                    if gate is not None:
                        primary_lp = lp(first)
                        sure = primary_lp.amax(dim=-1) >= log_gate
                        need = [not (s or d) for s, d in zip(sure.tolist(), done, strict=True)]
                        result.gated_steps += done.count(False)
                        result.ensembled_steps += sum(need)
                    if need is not None and not any(need):
                        step = primary_lp  # every open row is confident: the others are not run
                    else:
                        stacked = torch.stack([logits(i) for i in range(len(which))])
                        step = combine.mix_logits(stacked, w, method)
                        if gate is not None:
                            step = torch.where(sure[:, None], primary_lp, step)
                nxt = combine.choose(step, temperature, generator)
                tokens = nxt.tolist()
                for row, token in enumerate(tokens):
                    if not done[row]:
                        produced[row].append(token)
                        done[row] = token == eos
                if all(done):
                    break
                batch.append(nxt)
        for i in which:
            result.forwarded_tokens[i] += states[i].forwarded
        answers = []
        for prompt, out in zip(prompts, produced, strict=True):
            finished = bool(out) and eos is not None and out[-1] == eos
            text = tok.decode(out, skip_special_tokens=True)
            answers.append(Answer(prompt, text, len(out), finished))
        return answers

    def _generate_text(self, prompt: str, max_new: int, temperature: float, generator: torch.Generator,
                       result: GenerationResult) -> Answer:
        """Decoding over different vocabularies: the text grows by the bytes of each chosen token."""
        streams = [TextStream(m) for m in self.members]
        buf = prompt.encode("utf-8")
        out = b""
        steps, finished = 0, False
        gate = getattr(self.params, "gate", None)
        primary = self.primary_member
        for _ in range(max_new):
            cut = longest_complete_prefix(buf)
            text, pending = buf[:cut].decode("utf-8"), buf[cut:]
            if not streams[self.primary].set_text(text, pending):
                raise FusekitError(f"the primary '{primary.ref}' has no single-byte tokens, so it cannot "
                                   "continue inside a character; choose a byte-level primary")
            p_lp = streams[self.primary].logprobs()
            result.gated_steps += gate is not None
            piece: bytes | None
            if gate is not None and bool(combine.confident(p_lp, gate)):
                allowed = utf8_mask(primary.vocab.keys, pending).to(p_lp.device)
                allowed[primary.vocab.eos_id if primary.vocab.eos_id is not None else 0] |= not pending
                token = int(combine.choose(p_lp.masked_fill(~allowed, float("-inf"))[None], temperature,
                                           generator)[0])
                piece = primary.vocab.pieces[token]
                is_eos = token == primary.vocab.eos_id
            else:
                result.ensembled_steps += gate is not None
                present = [i == self.primary or s.set_text(text, pending) for i, s in enumerate(streams)]
                lps = {i: s.logprobs() for i, s in enumerate(streams) if present[i]}
                piece, is_eos = self._choose_cross(lps, pending, temperature, generator)
            steps += 1
            if is_eos and self.recipe.generation.stop_at_eos:
                finished = True
                break
            if piece is None:  # a special token other than end-of-sequence: nothing to spell
                continue
            buf += piece
            out += piece
        for i, s in enumerate(streams):
            result.forwarded_tokens[i] += s.forwarded_tokens
        return Answer(prompt, out.decode("utf-8", errors="replace"), steps, finished)

    def cross_weights(self, present: Sequence[int]) -> dict[int, float]:
        """Weights of the members taking part at one position, renormalised to sum to 1."""
        total = sum(self.weights[i] for i in present)
        return {i: self.weights[i] / total for i in present}

    def _choose_cross(self, lps: dict[int, torch.Tensor], pending: bytes, temperature: float,
                      generator: torch.Generator) -> tuple[bytes | None, bool]:
        probs = {i: lp.exp().cpu() for i, lp in lps.items()}
        weights = self.cross_weights(list(lps))
        if self.method == "relative":
            assert self._relative is not None
            p = self.params
            logp = self._relative.aggregate(probs, weights, steps=p.steps, learning_rate=p.learning_rate,
                                            candidates=p.candidates)
            vocab = self.primary_member.vocab
            allowed = utf8_mask(vocab.keys, pending).clone()
            if vocab.eos_id is not None and not pending:
                allowed[vocab.eos_id] = True
            logp = logp.masked_fill(~allowed, float("-inf"))
            token = int(combine.choose(logp[None], temperature, generator)[0])
            return vocab.pieces[token], token == vocab.eos_id
        assert self._union is not None
        all_probs = [probs.get(i, torch.zeros(m.vocab.width)) for i, m in enumerate(self.members)]
        all_weights = [weights.get(i, 0.0) for i in range(len(self.members))]
        dist = self._union.mix(all_probs, all_weights)
        if self.method == "topk_union":
            dist = self._union.restricted([p for p in all_probs], all_weights, self.params.top_k,
                                          present=list(lps))
        allowed = self._union.allowed(pending)
        dist = torch.where(allowed, dist, torch.zeros((), dtype=dist.dtype))
        pick = int(combine.choose(dist.log()[None], temperature, generator)[0])
        key = self._union.keys[pick]
        return (key, False) if isinstance(key, bytes) else (None, key == EOS_KEY)

    def _vote(self, prompts: Sequence[str], max_new: int, temperature: float, seed: int,
              result: GenerationResult) -> None:
        samples = self.params.samples
        for prompt in prompts:
            candidates: list[str] = []
            weights: list[float] = []
            for m in self.members:
                for s in range(samples):
                    generator = torch.Generator().manual_seed(seed + s)
                    answer = self._generate_ids([m.index], [1.0] * len(self.members), [prompt], max_new,
                                                temperature, generator, result, method="prob_avg")[0]
                    candidates.append(answer.text)
                    weights.append(self.weights[m.index] / samples)
            if self.method == "vote":
                best = majority(candidates, weights)
            else:
                best, _ = mbr(candidates, weights, self.params.utility)
            text = candidates[best]
            result.answers.append(Answer(prompt, text, len(text), True, candidates))


class _IdBatch:
    """A left-padded batch of token ids with room for the new tokens; members read views of it."""

    def __init__(self, seqs: Sequence[Sequence[int]], max_new: int, pad: int, device: torch.device) -> None:
        longest = max(len(s) for s in seqs)
        self.device = device
        self.tokens = torch.full((len(seqs), longest + max_new), pad, dtype=torch.long)
        mask = torch.ones((len(seqs), longest + max_new), dtype=torch.long)
        for row, seq in enumerate(seqs):
            self.tokens[row, longest - len(seq):longest] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, :longest - len(seq)] = 0
        self.padded = bool((mask == 0).any())  # without padding the model's causal mask suffices
        self.tokens, self.mask = self.tokens.to(device), mask.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        self.length = longest

    def append(self, token: torch.Tensor) -> None:
        self.tokens[:, self.length] = token.to(self.device)
        self.length += 1


class _IdState:
    """One member over an :class:`_IdBatch`: its KV cache and how far it has read the batch."""

    def __init__(self, member: Member, batch: _IdBatch) -> None:
        self.lm = member.lm
        self.batch = batch
        self.cache_key = cache_kwargs(self.lm.model, None)
        self.cache: Any = None
        self.fed = 0
        self.forwarded = 0
        self._logits: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """``(batch, vocab)`` float32 next-token logits after the batch's current length (a forward
        pass over the tokens this member has not read yet, once per length)."""
        b = self.batch
        if self._logits is None or self.fed != b.length:
            name = next(iter(self.cache_key))
            with torch.inference_mode():
                out = self.lm.model(input_ids=b.tokens[:, self.fed:b.length],
                                    attention_mask=b.mask[:, :b.length] if b.padded else None,
                                    position_ids=b.positions[:, self.fed:b.length], use_cache=True,
                                    **{name: self.cache})
            self.forwarded += (b.length - self.fed) * b.tokens.shape[0]
            self.fed = b.length
            self.cache = out.past_key_values
            self._logits = out.logits[:, -1].float()
        return self._logits


def _embeddings(member: Member, which: str) -> torch.Tensor:
    model = member.lm.model
    layer = model.get_output_embeddings() if which == "output" else model.get_input_embeddings()
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _default_cache_dir() -> Path:
    return cache_folder() / "align"


def load_members(recipe: EnsembleRecipe, *, device: str = "cpu", dtype: str | None = None) -> list[Member]:
    """Load every model of the recipe with its tokenizer."""
    from fusekit.lm import load_lm

    weights = recipe.weights()
    members = []
    for i, entry in enumerate(recipe.models):
        lm = load_lm(entry.model, device=device, dtype=dtype or recipe.dtype)
        members.append(Member(i, entry.model, lm, weights[i], token_vocab(lm.tokenizer, logit_width(lm))))
    return members


def load_ensemble(recipe: EnsembleRecipe | Path | str, *, device: str = "cpu",
                  dtype: str | None = None) -> Ensemble:
    """Load an ensemble recipe (a path or a parsed recipe) and every model it names.

    Example:
        >>> ens = load_ensemble("configs/ensemble/prob_avg.yaml")
        >>> ens.generate(["def fib("]).answers[0].text
    """
    source = None
    if not isinstance(recipe, EnsembleRecipe):
        recipe, source = load_ensemble_recipe(recipe)
    return Ensemble(recipe, load_members(recipe, device=device, dtype=dtype), source=source)


