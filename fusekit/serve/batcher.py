"""Dynamic batching for one model: a bounded request queue in front of one decode thread.

Requests arrive on the server's asyncio loop (:func:`stream_request`) and wait in a bounded
:class:`RequestQueue`; past ``max_queue`` waiting requests a new one is refused with
:class:`QueueFull` (HTTP 429) and a ``Retry-After`` estimate. One :class:`BatchWorker` thread per
model takes up to ``max_batch`` waiting requests (waiting ``batch_wait_ms`` for more to arrive) and
decodes them together, batch at a time, with the KV-cached decoder of :mod:`fusekit.lm.decode`:
prompts are left-padded with explicit position ids, so every prompt gets the continuation it gets
alone (the property ``fusekit.lm.generate`` relies on). After every step each request's new token
goes to its own asyncio queue (``loop.call_soon_threadsafe``) as a :class:`Delta`:

- text is detokenised incrementally (:class:`TextCutter`): it never ends inside a UTF-8 character
  and never shows text a stop string will cut; a stop string ends the request;
- each request samples with its own ``torch.Generator`` (from ``seed``), so what it samples does
  not depend on its batch mates; ``top_p`` keeps the smallest set of tokens whose probability
  reaches ``top_p``; log-probabilities come from the distribution the token was drawn from (the
  model's at ``temperature``, 1 for greedy) before ``top_p``;
- a request whose consumer closed the stream is dropped at the next step (its row is masked: it
  no longer streams or counts, and the batch ends as soon as every row is finished or dropped).

Methods with no batched path (ensembles, routing decisions) use :class:`SerialWorker`: the same
bounded queue, one request at a time in one thread.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fusekit.errors import FusekitError
from fusekit.lm.decode import CachedModel, TokenBatch, sample
from fusekit.serve.stops import first_stop, held_back

__all__ = ["BatchWorker", "Delta", "NoChatTemplate", "QueueFull", "RequestQueue", "SamplingParams",
           "SerialWorker", "TextCutter", "stream_request"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request decodes.

    Attributes:
        max_tokens: most new tokens.
        temperature: 0 for greedy decoding, else the softmax temperature.
        top_p: nucleus sampling: keep the most likely tokens whose probabilities sum to ``top_p``.
        seed: seeds this request's sampler (None: a random seed).
        stop: strings that end the text (the first one found is cut off with what follows).
        logprobs: how many top alternatives to report per token (None: no log-probabilities).
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None


@dataclass
class Delta:
    """One streamed piece of one choice.

    Attributes:
        text: new text (already cut at a stop string; never splits a UTF-8 character).
        token_ids: the tokens decoded in this step (their text may be held back or cut).
        logprobs: per token ``{"token", "logprob", "top_logprobs": {text: logprob}}``, or None.
        finish_reason: ``"stop"`` (end of sequence or a stop string) or ``"length"`` on the last
            Delta, else None.
        model: for routers, the model that answers (on the first Delta).
    """

    text: str
    token_ids: list[int]
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    model: str | None = None


class QueueFull(Exception):
    """The bounded queue is full; retry after ``retry_after`` seconds (HTTP 429)."""

    def __init__(self, retry_after: float) -> None:
        super().__init__(f"the request queue is full; retry after {retry_after:.1f} s")
        self.retry_after = retry_after


class NoChatTemplate(FusekitError):
    """The model's tokenizer has no chat template (HTTP 400)."""


@dataclass(eq=False)
class Request:
    """One accepted request: its prompt ids, options and the asyncio queue its Deltas go to.

    Attributes:
        prompt_ids: token ids of the prompt (model requests) or empty (serial requests).
        prompt: the prompt text.
        params: its sampling options.
        loop: the event loop its consumer runs on.
        out: the consumer's queue: Deltas, then the final one (``finish_reason`` set) or an error.
        cancelled: set when the consumer closed the stream.
    """

    prompt_ids: list[int]
    prompt: str
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue[Delta | BaseException] = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def push(self, item: Delta | BaseException) -> None:
        """Hand ``item`` to the consumer from any thread (dropped if its loop has closed)."""
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.cancelled = True

    def generator(self) -> torch.Generator:
        """This request's own random source (its ``seed``, else a random one)."""
        seed = self.params.seed if self.params.seed is not None else secrets.randbits(62)
        return torch.Generator().manual_seed(seed)


def deliver(items: Sequence[tuple[Request, Delta]]) -> None:
    """Hand each request its Delta from the decode thread, waking each event loop once per step."""
    by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Request, Delta]]] = {}
    for request, delta in items:
        by_loop.setdefault(request.loop, []).append((request, delta))
    for loop, group in by_loop.items():
        try:
            loop.call_soon_threadsafe(_put_all, group)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            for request, _ in group:
                request.cancelled = True


def _put_all(group: Sequence[tuple[Request, Delta]]) -> None:
    for request, delta in group:
        request.out.put_nowait(delta)


class RequestQueue:
    """Requests waiting for a worker, bounded; counts the ones being decoded too.

    Args:
        max_queue: most requests waiting (not yet decoding); one more raises :class:`QueueFull`.
        max_batch: most requests a worker takes at once (for the ``Retry-After`` estimate).
    """

    def __init__(self, max_queue: int, max_batch: int) -> None:
        self.max_queue = max_queue
        self.max_batch = max_batch
        self._waiting: deque[Request] = deque()
        self._running = 0
        self._cond = threading.Condition()
        self._closed = False
        self._seconds_per_batch = 1.0

    def submit(self, request: Request) -> None:
        """Queue ``request``.

        Raises:
            QueueFull: ``max_queue`` requests are already waiting (or the queue is closed).
        """
        with self._cond:
            if self._closed or len(self._waiting) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._waiting.append(request)
            self._cond.notify()

    def retry_after(self) -> float:
        """Seconds until a waiting slot is likely free: batches ahead times seconds per batch."""
        ahead = len(self._waiting) // max(1, self.max_batch) + 1
        return round(max(1.0, ahead * self._seconds_per_batch), 1)

    def take(self, most: int, wait_s: float) -> list[Request]:
        """Up to ``most`` waiting requests, blocking until one arrives, then waiting up to ``wait_s``
        seconds for more; an empty list once the queue is closed and drained."""
        with self._cond:
            while not self._waiting and not self._closed:
                self._cond.wait()
            deadline = time.monotonic() + wait_s
            while len(self._waiting) < most and not self._closed:
                left = deadline - time.monotonic()
                if left <= 0 or not self._cond.wait(left):
                    break
            taken = [self._waiting.popleft() for _ in range(min(most, len(self._waiting)))]
            self._running += len(taken)
            return taken

    def finished(self, requests: Sequence[Request], seconds: float) -> None:
        """Mark ``requests`` (taken together) done after ``seconds`` of decoding."""
        with self._cond:
            self._running -= len(requests)
            self._seconds_per_batch = 0.8 * self._seconds_per_batch + 0.2 * seconds

    def cancel(self, request: Request) -> None:
        """The consumer left: a waiting request leaves the queue, a running one is dropped by its
        worker at the next step."""
        request.cancelled = True
        with self._cond:
            if request in self._waiting:
                self._waiting.remove(request)

    def depth(self) -> int:
        """Requests accepted and not finished: waiting plus decoding."""
        with self._cond:
            return len(self._waiting) + self._running

    def close(self) -> None:
        """Refuse new requests; workers finish what is queued, then stop."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()


async def stream_request(queue: RequestQueue, request: Request) -> AsyncIterator[Delta]:
    """Submit ``request`` and yield its Deltas until the last one; closing the generator (or
    cancelling the task iterating it) cancels the request and frees its slot.

    Raises:
        QueueFull: on the first iteration, when the queue is full.
        FusekitError: an error the worker met for this request.
    """
    queue.submit(request)
    try:
        while True:
            item = await request.out.get()
            if isinstance(item, BaseException):
                raise item
            yield item
            if item.finish_reason is not None:
                return
    finally:
        queue.cancel(request)


class TextCutter:
    """Incremental detokenisation of one request's new tokens, with stop strings.

    The text shown so far is always a prefix of the final text: a trailing U+FFFD (an unfinished
    UTF-8 character) and any tail that could begin a stop string are held back until they resolve.
    Only the tokens after the last settled point (with a few tokens before it, so a tokenizer that
    spells a token differently at the start of a text still joins the pieces right) are decoded
    again at each step, so a long answer costs no more per token than a short one.

    Args:
        tokenizer: decodes ids (special tokens are dropped, as ``fusekit.lm.generate`` drops them).
        stop: stop strings.
    """

    CONTEXT = 4  # tokens before the settled point decoded with the tail
    SETTLE = 32  # tokens after which the settled point moves on

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self._base = 0  # ids[:_base] decode to _base_text, a settled prefix of the text
        self._base_text = ""

    def add(self, token: int, *, final: bool = False) -> str:
        """Add one token; returns the text that can be shown now (all of the rest when ``final``).
        After a stop string, :attr:`stopped` is True and the text ends before it."""
        self.ids.append(token)
        return self.flush(final=final)

    def flush(self, *, final: bool) -> str:
        """The text not shown yet that can be shown now (all of it when ``final``)."""
        full = self._decoded()
        cut = first_stop(full, self.stop, len(self.sent))
        if cut is not None:
            self.stopped = True
            full, final = full[:cut], True
        if not final:
            full = full.rstrip("\ufffd")
            full = full[:len(full) - held_back(full, self.stop, len(self.sent))]
        if not full.startswith(self.sent):
            return ""  # the tokenizer re-spelled earlier text; wait until it settles
        new, self.sent = full[len(self.sent):], full
        return new

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def _decoded(self) -> str:
        """The text of every id so far: the settled prefix, then the tail decoded with context."""
        context = max(0, self._base - self.CONTEXT)
        head, tail = self._decode(self.ids[context:self._base]), self._decode(self.ids[context:])
        full = self._base_text + tail[len(head):] if tail.startswith(head) else self._decode(self.ids)
        if len(self.ids) - self._base >= self.SETTLE and not full.endswith("\ufffd"):
            self._base, self._base_text = len(self.ids), full
        return full


@dataclass
class _Row:
    """One request's state inside a batch."""

    request: Request
    cutter: TextCutter
    generator: torch.Generator | None
    produced: int = 0
    done: bool = False


def top_p_filter(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """``scores`` (``(vocab,)``) with tokens outside the nucleus set to ``-inf``: the most likely
    tokens of ``softmax(scores / temperature)`` whose probabilities first reach ``top_p`` stay."""
    probs = torch.softmax(scores.float() / temperature, dim=-1)
    ordered, order = probs.sort(descending=True)
    before = ordered.cumsum(-1) - ordered  # probability mass of the tokens ranked above each one
    drop = torch.zeros_like(probs, dtype=torch.bool)
    drop[order] = before >= top_p
    drop[order[0]] = False  # the most likely token always stays
    return scores.masked_fill(drop, float("-inf"))


class BatchWorker:
    """One thread decoding a model's queued requests, up to ``max_batch`` together.

    Args:
        lm: the loaded model (:class:`fusekit.lm.LoadedLM`) with its tokenizer.
        queue: where requests wait.
        batch_wait_ms: how long to wait for more requests once one has arrived.

    Attributes:
        steps: decode steps run so far (one forward pass of the batch each).
        largest_batch: the most requests decoded together so far.
    """

    def __init__(self, lm: Any, queue: RequestQueue, *, batch_wait_ms: float = 5.0) -> None:
        self.lm = lm
        self.queue = queue
        self.batch_wait_s = batch_wait_ms / 1000.0
        eos = lm.tokenizer.eos_token_id
        self.eos = eos if isinstance(eos, int) else None
        self._token_text: dict[int, str] = {}
        self.steps = 0
        self.largest_batch = 0
        self.thread = threading.Thread(target=self._serve, name=f"fusekit-decode-{lm.ref}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            requests = self.queue.take(self.queue.max_batch, self.batch_wait_s)
            if not requests:
                return
            started = time.perf_counter()
            try:
                self.decode(requests)
            except Exception as exc:  # a bug or an out-of-memory: fail these requests, keep serving
                for r in requests:
                    r.push(exc)
            finally:
                self.queue.finished(requests, time.perf_counter() - started)

    def decode(self, requests: Sequence[Request]) -> None:
        """Decode ``requests`` together, streaming each one's Deltas, until all are finished or
        dropped."""
        most = max(r.params.max_tokens for r in requests)
        self.largest_batch = max(self.largest_batch, len(requests))
        batch = TokenBatch([r.prompt_ids for r in requests], most, pad=0, device=self.lm.device)
        model = CachedModel(self.lm.model, batch)
        rows = [_Row(r, TextCutter(self.lm.tokenizer, r.params.stop),
                     r.generator() if r.params.temperature > 0 else None) for r in requests]
        with torch.inference_mode():
            for _ in range(most):
                for row in rows:
                    row.done = row.done or row.request.cancelled
                if all(row.done for row in rows):
                    return
                logits = model.logits()
                self.steps += 1
                chosen = self._choose(logits, rows)
                tokens = chosen.tolist()
                deliver([(row.request, self._advance(row, tokens[i], logits[i]))
                         for i, row in enumerate(rows) if not row.done])
                batch.append(chosen)

    def _choose(self, logits: torch.Tensor, rows: Sequence[_Row]) -> torch.Tensor:
        """The next token of every row: argmax, or a draw with the row's own generator."""
        chosen = logits.argmax(dim=-1)
        for i, row in enumerate(rows):
            params = row.request.params
            if row.done or row.generator is None:
                continue
            scores = logits[i]
            if params.top_p < 1.0:
                scores = top_p_filter(scores, params.temperature, params.top_p)
            chosen[i] = sample(scores[None], params.temperature, row.generator)[0]
        return chosen

    def _advance(self, row: _Row, token: int, logits: torch.Tensor) -> Delta:
        """Record ``token`` for ``row``; returns its Delta (the last one when the row ends)."""
        params = row.request.params
        row.produced += 1
        ended = token == self.eos or row.produced >= params.max_tokens
        text = row.cutter.add(token, final=ended)
        finish = None
        if row.cutter.stopped or token == self.eos:
            finish = "stop"
        elif row.produced >= params.max_tokens:
            finish = "length"
        logprobs = [self.logprob_entry(logits, token, params)] if params.logprobs is not None else None
        row.done = finish is not None
        return Delta(text, [token], logprobs, finish)

    def logprob_entry(self, logits: torch.Tensor, token: int, params: SamplingParams) -> dict[str, Any]:
        """``{"token", "logprob", "top_logprobs"}`` for ``token`` under the distribution it was
        drawn from: ``log_softmax(logits / temperature)`` (temperature 1 when greedy)."""
        temperature = params.temperature if params.temperature > 0 else 1.0
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        k = min(max(0, params.logprobs or 0), logp.shape[-1])
        values, ids = logp.topk(k) if k else (logp[:0], logp[:0].long())
        top: dict[str, float] = {}
        for value, i in zip(values.tolist(), ids.tolist(), strict=True):
            top.setdefault(self.token_text(int(i)), float(value))  # a repeated spelling keeps its best
        return {"token": self.token_text(token), "logprob": float(logp[token]), "top_logprobs": top}

    def token_text(self, token: int) -> str:
        """One token's own text (cached); a token that is part of a UTF-8 character (its text alone
        is U+FFFD) is spelled as the tokenizer's vocabulary spells it, so each such token differs."""
        text = self._token_text.get(token)
        if text is None:
            text = str(self.lm.tokenizer.decode([token]))
            if "\ufffd" in text:
                text = str(self.lm.tokenizer.convert_ids_to_tokens(token))
            self._token_text[token] = text
        return text


class SerialWorker:
    """One thread running queued requests one at a time with ``run(request)``, which pushes the
    request's Deltas (methods with no batched path: ensembles).

    Args:
        name: names the thread.
        queue: where requests wait.
        run: decodes one request and pushes its Deltas.
    """

    def __init__(self, name: str, queue: RequestQueue, run: Callable[[Request], None]) -> None:
        self.queue = queue
        self.run = run
        self.thread = threading.Thread(target=self._serve, name=f"fusekit-serial-{name}", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            requests = self.queue.take(1, 0.0)
            if not requests:
                return
            started = time.perf_counter()
            try:
                if not requests[0].cancelled:
                    self.run(requests[0])
            except Exception as exc:  # a user error (FusekitError) or a bug: this request fails
                requests[0].push(exc)
            finally:
                self.queue.finished(requests, time.perf_counter() - started)
