"""Per-token log-probabilities of texts under one model, windowed exactly as :mod:`fusekit.lm.score`.

:func:`fusekit.lm.score.score_texts` sums each window's scored tokens; mixtures of members need the
tokens one by one. The windows, their order, batching and padding are the same, so the sum of
:func:`text_token_logprobs` of a text is that text's ``nll_nats`` (negated) to the last float64 bits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fusekit.errors import FusekitError
from fusekit.lm.load import LoadedLM
from fusekit.lm.score import text_windows, token_logprobs, window_batch
from fusekit.progress import label, steps


def text_token_logprobs(lm: LoadedLM, texts: Sequence[str], *, context: int | None = None,
                        stride: int | None = None, batch_size: int = 8) -> list[torch.Tensor]:
    """``log p(token_t | tokens before it)`` for every token of every text, in float64.

    Args:
        lm: a model loaded with its tokenizer.
        texts: the texts (each non-empty), tokenised without special tokens.
        context: longest window in tokens (default: the model's, at most 1024).
        stride: how far each further window moves (default ``context // 2``).
        batch_size: windows per forward pass.

    Returns:
        One ``(n_tokens,)`` float64 tensor per text; a first token with no start token before it is
        charged ``-ln(vocab)`` (a uniform guess), as :func:`~fusekit.lm.score.score_text` charges it.

    Raises:
        FusekitError: a text is empty, or context/stride are invalid.
    """
    if batch_size < 1:
        raise FusekitError(f"batch size {batch_size}: must be at least 1")
    windows, scores = text_windows(lm, texts, context=context, stride=stride)
    pieces = _run(lm, windows, batch_size, f"scoring tokens of {len(texts)} text(s) with {label(lm.ref)}")
    per_text = [[torch.tensor([-s.nll_nats] if s.nll_nats else [], dtype=torch.float64)] for s in scores]
    for window, piece in zip(windows, pieces, strict=True):
        per_text[window.text].append(piece)
    return [torch.cat(parts) for parts in per_text]


def _run(lm: LoadedLM, windows: Sequence[Any], batch_size: int, desc: str) -> list[torch.Tensor]:
    """Each window's scored log-probabilities, batched longest first with right padding as
    :func:`fusekit.lm.score.score_texts` batches them (so each value is the same float)."""
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    out: list[torch.Tensor] = [torch.empty(0, dtype=torch.float64)] * len(windows)
    with steps(desc, total=sum(len(w.ids) for w in windows), unit="tok") as advance:
        for lo in range(0, len(order), batch_size):
            picked = order[lo:lo + batch_size]
            chunk = [windows[i] for i in picked]
            ids, mask, scored = window_batch(chunk)
            logprobs = token_logprobs(lm, ids, mask).double().cpu()
            for row, i in enumerate(picked):
                out[i] = logprobs[row][scored[row]].clone()
            advance(sum(len(w.ids) for w in chunk))
    return out
