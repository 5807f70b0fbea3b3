"""Run the choices of one request on a backend: stop strings, token counts, several choices at once.

A request asks for ``len(prompts) × n`` choices; choice ``i × n + j`` continues prompt ``i`` with seed
``seed + j``. :func:`choice_pieces` runs one choice as a stream of :class:`Piece` objects, cutting the
text at the first stop string (text that might be the start of a stop string is held back until it is
known not to be) and closing the backend's stream as soon as the choice is done, which frees its batch
slot. :func:`merge_pieces` runs every choice concurrently and yields their pieces as they come;
leaving it early (a client that disconnected) cancels every choice still running.

Example:
    >>> cut = StopCutter(("\\n\\n",))
    >>> cut.feed("a\\n"), cut.feed("\\nb")
    (('a', False), ('', True))
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fusekit.serve.stops import first_stop, held_back

if TYPE_CHECKING:
    from fusekit.serve.backends import Backend, SamplingParams

__all__ = ["ChoiceJob", "ChoiceResult", "Piece", "StopCutter", "choice_pieces", "collect", "merge_pieces"]


class StopCutter:
    """Cut streamed text at the first of some stop strings, holding back a possible start of one.

    Args:
        stops: the stop strings (none: text passes straight through).
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """Take the next piece of text; return the text that is safe to emit and whether a stop string
        was met (the text before it is emitted, the stop string and everything after are dropped)."""
        if not self.stops:
            return text, False
        buffer = self.pending + text
        cut = first_stop(buffer, self.stops)
        if cut is not None:
            self.pending = ""
            return buffer[:cut], True
        keep = held_back(buffer, self.stops)
        self.pending = buffer[len(buffer) - keep:] if keep else ""
        return buffer[:len(buffer) - keep], False

    def flush(self) -> str:
        """The held-back text, once the stream ended without meeting a stop string."""
        text, self.pending = self.pending, ""
        return text


@dataclass(frozen=True)
class Piece:
    """One streamed piece of one choice.

    Attributes:
        index: the choice's index in the response.
        text: new text.
        logprobs: per-token log-probability records for the tokens of this piece (or None).
        finish_reason: ``stop`` or ``length`` on the choice's last piece, else None.
        model: for routers, the model that answers (on the choice's first piece).
    """

    index: int
    text: str
    logprobs: list[dict[str, Any]] | None = None
    finish_reason: str | None = None
    model: str | None = None


@dataclass(frozen=True)
class ChoiceJob:
    """What one choice continues, and how."""

    index: int
    prompt: str
    params: SamplingParams
    threshold: float | None = None


@dataclass
class ChoiceResult:
    """One choice, collected: its text, per-token log-probabilities, finish reason and model."""

    index: int
    text: str = ""
    logprobs: list[dict[str, Any]] = field(default_factory=list)
    finish_reason: str | None = None
    model: str | None = None


@dataclass
class Tally:
    """Completion tokens generated so far by the choices of one request (every token the backend made,
    those after a stop string included)."""

    completion_tokens: int = 0


async def choice_pieces(backend: Backend, job: ChoiceJob, tally: Tally) -> AsyncIterator[Piece]:
    """Run one choice on ``backend``: its pieces, cut at the job's stop strings, ending with a piece
    that carries the finish reason. The backend's stream is closed when this generator ends or is
    closed, which cancels the generation.

    Raises:
        QueueFull: from the backend, when its queue is full (before any piece is yielded).
    """
    cutter = StopCutter(job.params.stop)
    stream = backend.stream(job.prompt, job.params, threshold=job.threshold)
    finish: str | None = None
    try:
        async for delta in stream:
            tally.completion_tokens += len(delta.token_ids)
            text, stopped = cutter.feed(delta.text)
            finish = "stop" if stopped else delta.finish_reason
            if stopped or finish is not None:
                text += "" if stopped else cutter.flush()
                yield Piece(job.index, text, delta.logprobs, finish, delta.model)
                return
            if text or delta.logprobs or delta.model is not None:
                yield Piece(job.index, text, delta.logprobs, None, delta.model)
    finally:
        await stream.aclose()  # type: ignore[attr-defined]
    yield Piece(job.index, cutter.flush(), None, finish or "stop", None)


async def merge_pieces(backend: Backend, jobs: Sequence[ChoiceJob], tally: Tally) -> AsyncIterator[Piece]:
    """Run every job concurrently; yield pieces in the order they are made.

    An error in one choice (a full queue) cancels the others and is raised here. Leaving the
    generator early cancels every choice still running.
    """
    if len(jobs) == 1:
        async for piece in _closing(choice_pieces(backend, jobs[0], tally)):
            yield piece
        return
    queue: asyncio.Queue[Piece | BaseException | None] = asyncio.Queue()

    async def pump(job: ChoiceJob) -> None:
        try:
            async for piece in _closing(choice_pieces(backend, job, tally)):
                await queue.put(piece)
        except Exception as exc:  # handed to the reader, which raises it
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.ensure_future(pump(job)) for job in jobs]
    try:
        running = len(tasks)
        while running:
            item = await queue.get()
            if item is None:
                running -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield item
    finally:
        for task in tasks:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*tasks, return_exceptions=True)


async def _closing(pieces: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    """Iterate ``pieces`` and close the generator however the loop ends."""
    try:
        async for piece in pieces:
            yield piece
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]


async def collect(pieces: AsyncIterator[Piece], count: int) -> list[ChoiceResult]:
    """Gather the pieces of ``count`` choices into one result per choice, in index order."""
    results = [ChoiceResult(i) for i in range(count)]
    try:
        async for piece in pieces:
            result = results[piece.index]
            result.text += piece.text
            result.logprobs += piece.logprobs or []
            result.finish_reason = piece.finish_reason or result.finish_reason
            result.model = result.model or piece.model
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]
    return results


def seeded(params: SamplingParams, offset: int) -> SamplingParams:
    """``params`` with the seed moved on by ``offset`` (choice ``j`` of ``n`` uses seed + j)."""
    return params if params.seed is None or offset == 0 else replace(params, seed=params.seed + offset)
