"""Combine next-token distributions over one shared vocabulary.

All functions take log-probabilities stacked over members, ``(n_members, ..., vocab)``, and
weights ``(n_members,)`` that are non-negative and sum to 1, and return log-probabilities
``(..., vocab)``. They are pure: no models, no recipes.
"""

from __future__ import annotations

import torch


def _log_weights(weights: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    w = weights.to(device=like.device, dtype=like.dtype)
    return torch.log(w).reshape(-1, *([1] * (like.dim() - 1)))  # log 0 = -inf drops a member


def prob_avg(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log Σ_i w_i p_i``: the weighted mixture of the members' distributions."""
    return torch.logsumexp(logprobs + _log_weights(weights, logprobs), dim=0)


def logit_avg(logprobs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``log_softmax(Σ_i w_i log p_i)``: a weighted product of experts (logits averaged).

    Averaging log-probabilities equals averaging logits, since each differs from its logits by a
    per-position constant that the softmax removes.
    """
    w = weights.to(device=logprobs.device, dtype=logprobs.dtype).reshape(-1, *([1] * (logprobs.dim() - 1)))
    mixed = torch.where(w > 0, logprobs * w, torch.zeros((), dtype=logprobs.dtype, device=logprobs.device))
    return torch.log_softmax(mixed.sum(dim=0), dim=-1)


def mix_logits(logits: torch.Tensor, weights: torch.Tensor, method: str) -> torch.Tensor:
    """The decoding loop's fast form of :func:`prob_avg` / :func:`logit_avg`: raw logits
    ``(n_members, ..., vocab)`` in, log-probabilities ``(..., vocab)`` out, in a handful of fused
    tensor operations (one softmax over all members, one weighted sum)."""
    w = weights.to(device=logits.device, dtype=logits.dtype)
    n, shape = logits.shape[0], logits.shape[1:]
    if method == "prob_avg":
        return torch.log(torch.mv(torch.softmax(logits, dim=-1).reshape(n, -1).T, w).reshape(shape))
    if method == "logit_avg":
        lp = torch.log_softmax(logits, dim=-1)
        lp = torch.where(w.reshape(-1, *([1] * (lp.dim() - 1))) > 0, lp, torch.zeros((), dtype=lp.dtype))
        return torch.log_softmax(torch.mv(lp.reshape(n, -1).T, w).reshape(shape), dim=-1)
    raise ValueError(f"mix_logits: unknown method {method!r}")


def confident(logprobs: torch.Tensor, threshold: float) -> torch.Tensor:
    """``(...,)`` True where the top probability of ``logprobs (..., vocab)`` is at least ``threshold``."""
    return logprobs.max(dim=-1).values >= torch.log(torch.tensor(threshold, dtype=logprobs.dtype))


def gate(primary: torch.Tensor, combined: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """The primary's distribution where it is confident (top probability ≥ ``threshold``), else
    the combined one. ``threshold`` None always takes the combined distribution."""
    if threshold is None:
        return combined
    return torch.where(confident(primary, threshold)[..., None], primary, combined)


def cascade(logprobs: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Members ordered cheap → expensive; each position takes the first member whose top
    probability is at least ``threshold``, or the last member.

    Returns:
        ``(log-probs (..., vocab), chosen member index (...,))``.
    """
    ok = confident(logprobs, threshold)  # (n_members, ...)
    ok[-1] = True
    chosen = torch.argmax(ok.to(torch.int8), dim=0)  # the first True
    picked = torch.gather(logprobs, 0, chosen[None, ..., None].expand(1, *logprobs.shape[1:]))[0]
    return picked, chosen

