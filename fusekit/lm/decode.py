"""The one decoder: the sampler and the batched, KV-cached decode loop.

:func:`fusekit.lm.generate.generate`, ensembles (:mod:`fusekit.ensemble`) and routers
(``fusekit route run --generate``) all decode through this module, so one seed samples the same
tokens wherever it is used:

- :func:`sample` picks the next token of each row: the argmax at temperature 0, else a draw from
  ``softmax(scores / temperature)`` in float32 on the CPU with a seeded ``torch.Generator``.
- :class:`TokenBatch` holds left-padded prompts with room for the new tokens and explicit position
  ids, so a prompt's greedy continuation does not depend on the batch it is in.
- :class:`CachedModel` runs one model over a :class:`TokenBatch` with its own KV cache, reading
  only the tokens it has not seen yet, and only when asked (several models can share one batch and
  each runs only when its logits are needed).
- :func:`decode_loop` asks a step function for next-token scores, samples, appends and stops at
  end-of-sequence.

Example:
    >>> batch = TokenBatch([[1, 5, 9], [1, 7]], max_new_tokens=8, pad=0, device=lm.device)  # doctest: +SKIP
    >>> model = CachedModel(lm.model, batch)  # doctest: +SKIP
    >>> new = decode_loop(batch, lambda open_rows: model.logits(), max_new_tokens=8)  # doctest: +SKIP
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

Step = Callable[[list[bool]], torch.Tensor]
"""Next-token scores ``(batch, vocab)`` (logits or log-probabilities) for the batch's current length;
the argument says which rows are done (a step may skip work for those)."""

_CACHE_KEYWORD: dict[type, str] = {}


def cache_keyword(model: Any) -> str:
    """The keyword a model's forward takes its KV cache by: ``cache`` in transformers 5, else
    ``past_key_values``; the model output has an attribute of the same name.

    Args:
        model: a transformers causal LM.

    Returns:
        ``"cache"`` or ``"past_key_values"``.
    """
    name = _CACHE_KEYWORD.get(type(model))
    if name is None:
        params = inspect.signature(model.forward).parameters
        name = "cache" if "cache" in params else "past_key_values"
        _CACHE_KEYWORD[type(model)] = name
    return name


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{keyword: cache}`` to pass a KV cache (or None) to ``model``'s forward.

    Args:
        model: a transformers causal LM.
        cache: the cache the previous forward returned, or None.

    Returns:
        One keyword argument, named as :func:`cache_keyword` says.
    """
    return {cache_keyword(model): cache}


def sample(scores: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """The next token of each row: greedy at temperature 0, else a seeded sample.

    A sample is drawn from ``softmax(float32(scores) / temperature)`` on the CPU, so CPU and GPU runs
    with the same generator agree. Log-probabilities and logits give the same distribution; rows may
    hold ``-inf`` for tokens that are not allowed.

    Args:
        scores: ``(batch, vocab)`` logits or log-probabilities.
        temperature: 0 (or less) for the argmax, else the softmax temperature.
        generator: the random source for sampling (ignored at temperature 0).

    Returns:
        ``(batch,)`` token ids on ``scores``' device.

    Example:
        >>> sample(torch.tensor([[0.0, 2.0, 1.0]]), 0.0, None)  # doctest: +SKIP
        tensor([1])
    """
    if temperature <= 0:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores.float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].to(scores.device)


class TokenBatch:
    """Left-padded prompts with room for ``max_new_tokens`` more; models read views of it.

    Args:
        prompts: token ids of each prompt (each non-empty).
        max_new_tokens: columns to reserve for new tokens.
        pad: id written into padding (masked, so any valid id).
        device: where the tensors live (the first model's device).

    Attributes:
        tokens: ``(batch, longest + max_new_tokens)`` ids (``pad`` where there is no token yet).
        mask: the attention mask over ``tokens`` (0 on the left padding, 1 elsewhere).
        positions: position ids, counting from each prompt's first real token.
        padded: whether any row is padded (without padding the causal mask suffices).
        length: how many columns hold tokens so far.
    """

    def __init__(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, pad: int,
                 device: torch.device | str) -> None:
        longest = max(len(p) for p in prompts)
        self.device = torch.device(device)
        tokens = torch.full((len(prompts), longest + max_new_tokens), pad, dtype=torch.long)
        mask = torch.ones((len(prompts), longest + max_new_tokens), dtype=torch.long)
        for row, seq in enumerate(prompts):
            tokens[row, longest - len(seq):longest] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, :longest - len(seq)] = 0
        self.padded = bool((mask == 0).any())
        self.tokens, self.mask = tokens.to(self.device), mask.to(self.device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp_min(0)
        self.length = longest

    @property
    def rows(self) -> int:
        """Number of prompts in the batch."""
        return int(self.tokens.shape[0])

    def append(self, token: torch.Tensor) -> None:
        """Write the next token of every row (``(batch,)`` ids) into the next column."""
        self.tokens[:, self.length] = token.to(self.device)
        self.length += 1


class CachedModel:
    """One model over a :class:`TokenBatch`: its KV cache and how far it has read the batch.

    Args:
        model: a transformers causal LM on ``batch.device``.
        batch: the batch this model reads.

    Attributes:
        forwarded: token positions run through the model so far (rows times columns).
    """

    def __init__(self, model: Any, batch: TokenBatch) -> None:
        self.model = model
        self.batch = batch
        self.keyword = cache_keyword(model)
        self.cache: Any = None
        self.fed = 0
        self.forwarded = 0
        self._logits: torch.Tensor | None = None

    def logits(self) -> torch.Tensor:
        """``(batch, vocab)`` float32 next-token logits after the batch's current length.

        Runs one forward pass over the columns this model has not read yet, at most once per length.
        """
        b = self.batch
        if self._logits is None or self.fed != b.length:
            with torch.inference_mode():
                out = self.model(input_ids=b.tokens[:, self.fed:b.length],
                                 attention_mask=b.mask[:, :b.length] if b.padded else None,
                                 position_ids=b.positions[:, self.fed:b.length], use_cache=True,
                                 **{self.keyword: self.cache})
            self.forwarded += (b.length - self.fed) * b.rows
            self.fed = b.length
            self.cache = getattr(out, self.keyword)
            self._logits = out.logits[:, -1].float()
        return self._logits


def decode_loop(batch: TokenBatch, step: Step, *, max_new_tokens: int, temperature: float = 0.0,
                generator: torch.Generator | None = None, eos: int | None = None) -> list[list[int]]:
    """Decode up to ``max_new_tokens`` tokens for every row of ``batch``.

    Each iteration asks ``step`` for next-token scores, picks one token per row with :func:`sample`
    and appends it. A row that emits ``eos`` is finished (the ``eos`` token is kept in its output);
    the loop ends when every row is finished.

    Args:
        batch: the prompts; new tokens are appended to it.
        step: scores ``(batch, vocab)`` for the current length, given which rows are done.
        max_new_tokens: most tokens per row (at most the room reserved in ``batch``).
        temperature: see :func:`sample`.
        generator: see :func:`sample`.
        eos: end-of-sequence id, or None to never stop early.

    Returns:
        The new token ids of each row.
    """
    done = [False] * batch.rows
    produced: list[list[int]] = [[] for _ in range(batch.rows)]
    with torch.inference_mode():  # one context for the whole loop: no per-step set-up
        for _ in range(max_new_tokens):
            chosen = sample(step(done), temperature, generator)
            for row, token in enumerate(chosen.tolist()):
                if not done[row]:
                    produced[row].append(token)
                    done[row] = eos is not None and token == eos
            if all(done):
                break
            batch.append(chosen)
    return produced
