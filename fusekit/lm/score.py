"""Score text with a causal LM: negative log-likelihood, bits per byte and perplexity.

Bits per byte divides the text's total negative log-likelihood (in bits) by the number of UTF-8
bytes of the text, so it compares models with different tokenizers; perplexity is per token of the
model's own tokenizer. This is the measuring stick ``fusekit score``, ``fusekit ensemble score`` and
``fusekit route`` share, so merges, ensembles and routers are measured the same way.

Example:
    >>> lm = load_lm("demo-out/experts/python")  # doctest: +SKIP
    >>> text = Path("demo-out/experts/heldout/python.txt").read_text(encoding="utf-8")  # doctest: +SKIP
    >>> print(f"{score_text(lm, text).bits_per_byte:.3f} bits per byte")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from fusekit.errors import FusekitError
from fusekit.io.userfiles import TEXT_LIMIT, read_user_text
from fusekit.lm.load import LoadedLM
from fusekit.progress import label, steps

DEFAULT_MAX_CONTEXT = 1024
"""Longest window :func:`score_text` uses by default (or the model's max positions, if smaller)."""


@dataclass
class TextScore:
    """How well a model predicts one text.

    Attributes:
        n_bytes: length of the text in UTF-8 bytes.
        n_tokens: tokens scored (the text's tokens under the model's tokenizer).
        nll_nats: total negative log-likelihood of those tokens, in nats.
    """

    n_bytes: int
    n_tokens: int
    nll_nats: float

    @property
    def bits_per_byte(self) -> float:
        """``nll_nats / ln 2 / n_bytes``: comparable across tokenizers."""
        return self.nll_nats / math.log(2) / self.n_bytes if self.n_bytes else math.nan

    @property
    def perplexity(self) -> float:
        """``exp(nll_nats / n_tokens)``: per token of this model's tokenizer."""
        return math.exp(self.nll_nats / self.n_tokens) if self.n_tokens else math.nan

    def __add__(self, other: TextScore) -> TextScore:
        """The score of two texts together (bytes, tokens and NLL added)."""
        return TextScore(self.n_bytes + other.n_bytes, self.n_tokens + other.n_tokens,
                         self.nll_nats + other.nll_nats)


@dataclass(frozen=True)
class _Window:
    """One forward pass: ``ids`` as input; logits at positions ``first - 1 .. len - 2`` are scored."""

    text: int  # index of the text it belongs to
    ids: list[int]
    first: int  # first position whose token is scored (>= 1)


def max_context(lm: LoadedLM) -> int:
    """The model's longest input (``max_position_embeddings`` or ``n_positions``), or None → 1024."""
    config = lm.model.config
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return DEFAULT_MAX_CONTEXT


def resolve_window(lm: LoadedLM, context: int | None, stride: int | None) -> tuple[int, int]:
    """``(context, stride)`` for scoring with ``lm``: defaults filled in, bad values refused."""
    limit = max_context(lm)
    if context is None:
        context = min(limit, DEFAULT_MAX_CONTEXT)
    elif context < 2:
        raise FusekitError(f"--context {context}: a window needs at least 2 tokens")
    elif context > limit:
        raise FusekitError(f"--context {context}: model '{lm.ref}' takes at most {limit} positions; "
                           f"use --context {limit} or less")
    if stride is None:
        stride = max(1, context // 2)
    elif not 1 <= stride <= context - 1:
        raise FusekitError(f"stride {stride}: must be between 1 and context - 1 ({context - 1}) so "
                           "that every token has at least one token of left context")
    return context, stride


def _start_token(lm: LoadedLM) -> int | None:
    tok = lm.tokenizer
    if tok is None:
        raise FusekitError(f"model '{lm.ref}' was loaded without a tokenizer; scoring text needs one")
    for token_id in (tok.bos_token_id, tok.eos_token_id):
        if isinstance(token_id, int):
            return token_id
    return None


def encode(lm: LoadedLM, text: str) -> list[int]:
    """The text's token ids under ``lm``'s tokenizer, without special tokens."""
    if lm.tokenizer is None:
        raise FusekitError(f"model '{lm.ref}' was loaded without a tokenizer; scoring text needs one")
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids]


def sliding_windows(index: int, seq: list[int], context: int, stride: int) -> list[_Window]:
    """Cover positions 1..len(seq)-1 of ``seq`` once each, windows of at most ``context`` tokens."""
    windows: list[_Window] = []
    end = min(context, len(seq))
    if end >= 2:
        windows.append(_Window(index, seq[:end], 1))
    while end < len(seq):
        new_end = min(end + stride, len(seq))
        start = max(0, new_end - context)
        windows.append(_Window(index, seq[start:new_end], end - start))
        end = new_end
    return windows


def token_logprobs(lm: LoadedLM, ids: torch.Tensor,
                   attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Log-probability of each next token: ``out[b, t] = log p(ids[b, t + 1] | ids[b, :t + 1])``.

    Args:
        lm: a loaded model.
        ids: ``(batch, seq)`` token ids (any device; moved to ``lm.device``).
        attention_mask: ``(batch, seq)``, 1 for real tokens, 0 for right padding; None → all ones.

    Returns:
        ``(batch, seq - 1)`` float32 log-probabilities on ``lm.device`` (padding positions hold
        meaningless values; mask them yourself).
    """
    ids = ids.to(lm.device)
    mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(lm.device)
    with torch.inference_mode():
        logits = lm.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (batch, seq - 1, vocab)
        return logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)


def _run_windows(lm: LoadedLM, windows: Sequence[_Window], batch_size: int, desc: str) -> list[float]:
    """Summed NLL (nats) of each window's scored tokens, batched by similar length."""
    if batch_size < 1:
        raise FusekitError(f"batch size {batch_size}: must be at least 1")
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i].ids))
    nll = [0.0] * len(windows)
    with steps(desc, total=sum(len(w.ids) for w in windows), unit="tok") as advance:
        for lo in range(0, len(order), batch_size):
            picked = order[lo:lo + batch_size]
            _run_batch(lm, [windows[i] for i in picked], picked, nll)
            advance(sum(len(windows[i].ids) for i in picked))
    return nll


def window_batch(chunk: Sequence[_Window]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One batch of windows, right-padded: ``(ids, attention_mask, scored)``, the first two
    ``(batch, width)``, ``scored`` ``(batch, width - 1)`` marking the next-token positions charged."""
    width = max(len(w.ids) for w in chunk)
    ids = torch.zeros(len(chunk), width, dtype=torch.long)
    mask = torch.zeros(len(chunk), width, dtype=torch.long)
    scored = torch.zeros(len(chunk), width - 1, dtype=torch.bool)
    for row, w in enumerate(chunk):
        ids[row, :len(w.ids)] = torch.tensor(w.ids)
        mask[row, :len(w.ids)] = 1
        scored[row, w.first - 1:len(w.ids) - 1] = True
    return ids, mask, scored


def _run_batch(lm: LoadedLM, chunk: Sequence[_Window], indices: Sequence[int], nll: list[float]) -> None:
    """Score one batch of windows (right padding); ``nll[indices[row]]`` gets row's summed NLL."""
    ids, mask, scored = window_batch(chunk)
    logprobs = token_logprobs(lm, ids, mask).double().cpu()
    sums = torch.where(scored, -logprobs, torch.zeros((), dtype=torch.float64)).sum(dim=1)
    for row, i in enumerate(indices):
        nll[i] = float(sums[row])


def text_windows(lm: LoadedLM, texts: Sequence[str], *, context: int | None = None,
                 stride: int | None = None) -> tuple[list[_Window], list[TextScore]]:
    """The windows :func:`score_texts` runs, and each text's score before them: its bytes, its
    tokens and the first token's charge (0, or ``ln(vocab)`` without BOS and EOS)."""
    context, stride = resolve_window(lm, context, stride)
    start = _start_token(lm)
    vocab = lm.model.get_output_embeddings().weight.shape[0]
    windows: list[_Window] = []
    scores: list[TextScore] = []
    for index, text in enumerate(texts):
        if not text:
            raise FusekitError(f"text {index} is empty; there is nothing to score")
        ids = encode(lm, text)
        n_bytes = len(text.encode("utf-8"))
        if start is not None:
            seq = [start, *ids]
            scores.append(TextScore(n_bytes, len(ids), 0.0))
        else:  # no BOS or EOS: the first token is charged ln(vocab), a uniform guess
            seq = ids
            scores.append(TextScore(n_bytes, len(ids), math.log(vocab)))
        windows.extend(sliding_windows(index, seq, context, stride))
    return windows, scores


def score_texts(lm: LoadedLM, texts: Sequence[str], *, context: int | None = None,
                stride: int | None = None, batch_size: int = 8, desc: str | None = None) -> list[TextScore]:
    """Score each text on its own; windows of all texts are batched together (right padding).

    Same numbers as calling :func:`score_text` on each text (up to float rounding of batched
    matrix products). See :func:`score_text` for ``context``, ``stride`` and the first token.

    Args:
        lm: a model loaded with its tokenizer.
        texts: the texts (each non-empty).
        context: longest window in tokens; default the model's max positions, capped at 1024.
        stride: how far each further window moves; default ``context // 2``.
        batch_size: windows per forward pass.
        desc: what the progress bar on stderr says (default: how many texts, and the model).

    Returns:
        One :class:`TextScore` per text, in order.

    Raises:
        FusekitError: a text is empty, the model has no tokenizer, or context/stride are invalid.
    """
    windows, scores = text_windows(lm, texts, context=context, stride=stride)
    desc = desc or f"scoring {len(texts)} text{'s' if len(texts) != 1 else ''} with {label(lm.ref)}"
    for window, nll in zip(windows, _run_windows(lm, windows, batch_size, desc), strict=True):
        scores[window.text].nll_nats += nll
    return scores


def score_text(lm: LoadedLM, text: str, *, context: int | None = None, stride: int | None = None,
               batch_size: int = 8, desc: str | None = None) -> TextScore:
    """Negative log-likelihood of ``text`` under ``lm``, with bits per byte and perplexity.

    The text is tokenised without special tokens. Its first token is scored given the tokenizer's
    BOS token (or, when it has none, its EOS token, as GPT-2-style models use it); a tokenizer with
    neither has its first token charged ``ln(vocab_size)`` nats, a uniform guess, so every byte is
    still paid for. Texts longer than ``context`` tokens are scored with a sliding window: every
    token is scored exactly once, with at least ``context - stride`` tokens of left context
    (all of them within the first window).

    Args:
        lm: a model loaded with its tokenizer.
        text: the text; ``n_bytes`` is its UTF-8 length.
        context: longest window in tokens (BOS included); default the model's max positions,
            capped at 1024.
        stride: how far each further window moves; default ``context // 2``.
        batch_size: windows per forward pass.
        desc: what the progress bar on stderr says.

    Returns:
        The text's :class:`TextScore`.

    Raises:
        FusekitError: the text is empty, the model has no tokenizer, or context/stride are invalid.

    Example:
        >>> s = score_text(lm, "def f(x):\\n    return x\\n")  # doctest: +SKIP
        >>> s.bits_per_byte, s.perplexity  # doctest: +SKIP
    """
    return score_texts(lm, [text], context=context, stride=stride, batch_size=batch_size, desc=desc)[0]


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file to score; one-line errors for a missing, unreadable or empty file."""
    path = Path(path)
    if not path.exists():  # a FIFO or device exists: read_user_text refuses it by name
        raise FusekitError(f"text file {path} does not exist; pass a UTF-8 text file to --text")
    try:
        text = read_user_text(path, what="text file", limit=TEXT_LIMIT)
    except UnicodeDecodeError as exc:
        raise FusekitError(f"text file {path} is not UTF-8 (byte {exc.start}); convert it first") from None
    except OSError as exc:
        raise FusekitError(f"text file {path} cannot be read: {exc.strerror}") from None
    if not text:
        raise FusekitError(f"text file {path} is empty; there is nothing to score")
    return text
