"""Mixtures of same-tokenizer members from cached per-token log-probabilities.

A ``prob_avg`` ensemble of members that share one tokenizer predicts each token with
``Σ_i w_i p_i(t)``, so its bits per byte on a text is a function of each member's log-probability of
every actual next token, nothing more. :func:`member_token_logprobs` computes those once per member
(and caches them beside the per-text scores of :mod:`fusekit.lm.score_cache`), after which
:func:`mixture_bpb` scores any weighting and :func:`learn_weights` finds the best one without
running a model again.

Example:
    >>> lp = member_token_logprobs(["demo-out/experts/python", "demo-out/experts/c"], texts)  # doctest: +SKIP
    >>> w = learn_weights(lp)  # doctest: +SKIP
    >>> mixture_bpb(lp, w) <= mixture_bpb(lp, [0.5, 0.5])  # doctest: +SKIP
    True
"""

from __future__ import annotations

import gc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fusekit.errors import FusekitError

log = logging.getLogger("fusekit")


@dataclass(frozen=True)
class TokenLogprobs:
    """Every member's log-probability of every actual next token of some texts.

    Attributes:
        logprobs: ``(n_members, n_tokens)`` float64, ``log p_member(token_t | tokens before it)``,
            the tokens of all texts one after the other.
        n_bytes: UTF-8 bytes of the texts scored.
        refs: the members' references, in row order.
    """

    logprobs: torch.Tensor
    n_bytes: int
    refs: tuple[str, ...] = ()

    def subset(self, members: Sequence[int]) -> TokenLogprobs:
        """The rows of ``members`` only (in that order)."""
        rows = list(members)
        refs = tuple(self.refs[i] for i in rows) if self.refs else ()
        return TokenLogprobs(self.logprobs[rows], self.n_bytes, refs)


def member_token_logprobs(refs: Sequence[str], texts: Sequence[str], *, device: str = "cpu",
                          dtype: str | None = "float32", use_cache: bool = True, context: int | None = None,
                          stride: int | None = None, batch_size: int = 8) -> TokenLogprobs:
    """Each member's per-token log-probabilities of ``texts``, through the score cache.

    Texts are tokenised and windowed as :func:`fusekit.lm.score.score_texts` does it, so
    ``mixture_bpb(lp, one_hot(i))`` is member ``i``'s ``fusekit score`` bits per byte. A member is
    loaded only when some text has no cached log-probabilities, one member at a time.

    Args:
        refs: the members (model folders, Hub ids, adapters, ``base+adapter``); one tokenizer.
        texts: the texts (each non-empty).
        device: where the members run (``cpu``, ``cuda``, ``auto``).
        dtype: the load dtype (see :func:`fusekit.lm.load.load_lm`).
        use_cache: False scores everything and saves nothing.
        context: longest window in tokens (default: the model's, at most 1024).
        stride: how far each further window moves (default ``context // 2``).
        batch_size: windows per forward pass.

    Returns:
        A :class:`TokenLogprobs` with one row per member, in order.

    Raises:
        FusekitError: no members or texts, an empty text, two members with different tokenizers
            (naming both), or a member that cannot be loaded.
    """
    if not refs:
        raise FusekitError("no members were given; name at least one model")
    if not texts:
        raise FusekitError("no texts were given; the data has nothing to score")
    for index, text in enumerate(texts):
        if not text:
            raise FusekitError(f"text {index} is empty; there is nothing to score")
    check_same_tokenizer(refs)
    rows = [torch.cat(_member_rows(ref, texts, device=device, dtype=dtype, use_cache=use_cache,
                                   context=context, stride=stride, batch_size=batch_size)) for ref in refs]
    return TokenLogprobs(torch.stack(rows), sum(len(t.encode("utf-8")) for t in texts), tuple(refs))


def check_same_tokenizer(refs: Sequence[str]) -> None:
    """Refuse members whose tokenizers turn text into different ids (loads tokenizers only).

    Raises:
        FusekitError: one line naming the first two members that differ.
    """
    from fusekit.ensemble.members import token_vocab
    from fusekit.io.refs import resolve_model
    from fusekit.lm.load import load_tokenizer, tokenizer_folder

    by_folder: dict[str, str] = {}
    first: tuple[str, str] | None = None
    for ref in refs:
        folder = tokenizer_folder(resolve_model(ref))
        if str(folder) not in by_folder:
            tok = load_tokenizer(ref, folder)
            by_folder[str(folder)] = token_vocab(tok, len(tok)).fingerprint
        fingerprint = by_folder[str(folder)]
        if first is None:
            first = (ref, fingerprint)
        elif fingerprint != first[1]:
            raise FusekitError(f"members '{first[0]}' and '{ref}' have different tokenizers; a mixture of "
                               "token probabilities needs one tokenizer: choose members that share it")


def _member_rows(ref: str, texts: Sequence[str], *, device: str, dtype: str | None, use_cache: bool,
                 context: int | None, stride: int | None, batch_size: int) -> list[torch.Tensor]:
    """One member's per-token log-probabilities of each text: cached ones read, the others computed."""
    from fusekit.device import resolve_device
    from fusekit.io.refs import resolve_model
    from fusekit.lm.score_cache import ScoreCache, ScoreKey, cache_enabled, model_digest, text_digest

    digests = [text_digest(t) for t in texts]
    cache, key = ScoreCache(), None
    found: dict[str, torch.Tensor] = {}
    if cache_enabled(use_cache):
        key = ScoreKey(model_digest(resolve_model(ref)), context, stride, dtype, resolve_device(device).type)
        for digest in dict.fromkeys(digests):
            cached = cache.get_tokens(key, digest)
            if cached is not None:
                found[digest] = torch.tensor(cached, dtype=torch.float64)
    missing = {d: t for d, t in zip(digests, texts, strict=True) if d not in found}
    if missing:
        new = _score_now(ref, list(missing.values()), device=device, dtype=dtype, context=context,
                         stride=stride, batch_size=batch_size)
        for digest, values in zip(missing, new, strict=True):
            found[digest] = values
            if key is not None:
                cache.put_tokens(key, digest, values.tolist(), ref=ref)
    log.debug("%s: %d of %d texts' token log-probabilities from the cache", ref,
              len(texts) - len(missing), len(texts))
    return [found[d] for d in digests]


def _score_now(ref: str, texts: list[str], *, device: str, dtype: str | None, context: int | None,
               stride: int | None, batch_size: int) -> list[torch.Tensor]:
    """Load ``ref``, compute its per-token log-probabilities of ``texts``, release it."""
    from fusekit.lm.load import load_lm
    from fusekit.select.tokens import text_token_logprobs

    lm = load_lm(ref, device=device, dtype=dtype)
    try:
        return text_token_logprobs(lm, texts, context=context, stride=stride, batch_size=batch_size)
    finally:
        del lm
        gc.collect()


def normalised_weights(weights: Sequence[float], n_members: int) -> torch.Tensor:
    """``weights`` as a float64 tensor summing to 1.

    Raises:
        FusekitError: wrong count, a negative or non-finite weight, or all zero.
    """
    if len(weights) != n_members:
        raise FusekitError(f"{len(weights)} weight(s) for {n_members} member(s); give one weight per member")
    w = torch.tensor([float(x) for x in weights], dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()) or float(w.sum()) <= 0:
        raise FusekitError(f"weights {list(weights)}: must be finite, non-negative and not all zero")
    return w / w.sum()


def mixture_bpb(lp: TokenLogprobs, weights: Sequence[float]) -> float:
    """Bits per byte of the mixture ``Σ_i w_i p_i``: ``-Σ_t log Σ_i w_i p_i(t) / ln 2 / n_bytes``.

    Args:
        lp: the members' per-token log-probabilities.
        weights: one non-negative weight per member (normalised to sum to 1).

    Returns:
        The mixture's bits per byte (a one-hot weighting gives that member's own score).

    Example:
        >>> lp = TokenLogprobs(torch.log(torch.tensor([[0.5, 0.25], [0.25, 0.5]], dtype=torch.float64)), 2)
        >>> round(mixture_bpb(lp, [0.5, 0.5]), 6)
        1.415037
    """
    w = normalised_weights(weights, lp.logprobs.shape[0])
    mix = torch.logsumexp(lp.logprobs + torch.log(w)[:, None], dim=0)  # (n_tokens,)
    return float(-mix.sum()) / math.log(2) / lp.n_bytes


def learn_weights(lp: TokenLogprobs, *, steps: int = 500, init: Sequence[float] | None = None,
                  tol: float = 1e-12) -> list[float]:
    """The weights on the simplex that minimise :func:`mixture_bpb`, by active-set Newton steps.

    The objective ``f(w) = -mean_t log Σ_i w_i p_i(t)`` is convex. Each step solves the Newton system
    on the members with a positive weight under ``Σ_i w_i = 1`` (gradient ``g_i = -mean_t r_i(t)``,
    Hessian ``mean_t r_i(t) r_j(t)``, with ``r_i = p_i / Σ_j w_j p_j``), moves as far as the simplex
    allows with backtracking (a member whose weight reaches 0 leaves the set), and lets an excluded
    member back in when its gradient is below the others' (the KKT conditions). EM
    (``w_i ← mean_t w_i r_i(t)``) reaches the same optimum but crawls when members are alike.

    Args:
        lp: the members' per-token log-probabilities.
        steps: most Newton steps.
        init: starting weights (default uniform).
        tol: stop when a step gains less than this (relative to the objective).

    Returns:
        One weight per member, summing to 1.

    Example:
        >>> lp = TokenLogprobs(torch.log(torch.tensor([[0.9, 0.9], [0.1, 0.2]], dtype=torch.float64)), 2)
        >>> [round(x, 3) for x in learn_weights(lp)]
        [1.0, 0.0]
    """
    n = lp.logprobs.shape[0]
    w = normalised_weights(init if init is not None else [1.0] * n, n)
    value = _objective(lp.logprobs, w)
    for _ in range(steps):
        ratio = torch.exp(lp.logprobs - torch.logsumexp(lp.logprobs + torch.log(w)[:, None], dim=0))
        grad = -ratio.mean(dim=1)  # (n_members,)
        active = _active_set(w, grad)
        step = _newton_step(grad[active], ratio[active] @ ratio[active].T / ratio.shape[1])
        direction = torch.zeros_like(w)
        direction[active] = step
        w, new_value = _line_search(lp.logprobs, w, direction, value)
        if value - new_value <= tol * max(1.0, abs(value)):
            break
        value = new_value
    return [float(x) for x in w / w.sum()]


def _objective(logprobs: torch.Tensor, w: torch.Tensor) -> float:
    """``-mean_t log Σ_i w_i p_i(t)``."""
    return float(-torch.logsumexp(logprobs + torch.log(w)[:, None], dim=0).mean())


def _active_set(w: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Members the next step may move: positive weights, and zero weights whose gradient is below
    the mean gradient of the positive ones (moving weight to them lowers the objective)."""
    positive = w > 0
    level = float(grad[positive].mean())
    return positive | (grad < level - 1e-12 * abs(level))


def _newton_step(grad: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """The Newton step ``d`` with ``Σ d = 0``: ``[H 1; 1ᵀ 0] [d; ν] = [-g; 0]`` (a small ridge keeps
    ``H`` invertible when members are nearly alike)."""
    k = grad.shape[0]
    system = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    system[:k, :k] = hessian + torch.eye(k, dtype=torch.float64) * (1e-10 * float(hessian.diagonal().mean()))
    system[:k, k] = 1.0
    system[k, :k] = 1.0
    rhs = torch.cat([-grad, torch.zeros(1, dtype=torch.float64)])
    return torch.linalg.solve(system, rhs)[:k]


def _line_search(logprobs: torch.Tensor, w: torch.Tensor, direction: torch.Tensor,
                 value: float) -> tuple[torch.Tensor, float]:
    """The best of the steps ``w + a·d`` for ``a = a_max, a_max/2, ...`` (``a_max ≤ 1`` keeps ``w``
    on the simplex; a weight the full step empties is set to exactly 0), or ``w`` when none helps."""
    shrinking = direction < 0
    limit = float((w[shrinking] / -direction[shrinking]).min()) if bool(shrinking.any()) else 1.0
    alpha = min(1.0, limit)
    for _ in range(40):
        candidate = (w + alpha * direction).clamp_min(0.0)
        if alpha == limit:
            candidate[shrinking & (w / -direction.where(shrinking, torch.ones_like(w)) <= limit)] = 0.0
        if float(candidate.sum()) > 0:
            candidate = candidate / candidate.sum()
            new_value = _objective(logprobs, candidate)
            if new_value <= value:
                return candidate, new_value
        alpha /= 2
    return w, value
