"""Response bodies and streamed chunks in the OpenAI API's shapes, for completions and chat.

:class:`ChoiceRenderer` turns :class:`~fusekit.serve.choices.Piece` objects into streamed chunks
(``text_completion`` or ``chat.completion.chunk``) and collected choices into one response body.
Per-token log-probabilities come from the backend as ``{"token", "logprob", "top_logprobs": {text:
logprob}}`` and are written in each API's own layout: ``tokens`` / ``token_logprobs`` /
``top_logprobs`` / ``text_offset`` for completions, ``content: [{token, logprob, bytes,
top_logprobs}]`` for chat. A router's choice of model is added as ``"fusekit": {"routed_to": NAME}``
(OpenAI's clients keep fields they do not know).

Example:
    >>> r = ChoiceRenderer(chat=False, model="m", response_id="cmpl-1", prompt_lengths=[3], n=1)
    >>> r.chunks(Piece(0, "hi", None, "length"))[0]["choices"]
    [{'index': 0, 'text': 'hi', 'logprobs': None, 'finish_reason': 'length'}]
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from fusekit.serve.choices import ChoiceResult, Piece
from fusekit.serve.protocol import now

__all__ = ["ChoiceRenderer", "chat_logprobs", "completion_body", "completion_logprobs", "usage_body"]


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """OpenAI's ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(records: Sequence[dict[str, Any]], offset: int) -> dict[str, Any]:
    """The completions API's ``logprobs`` object for ``records``, whose text starts at ``offset``."""
    offsets = []
    for record in records:
        offsets.append(offset)
        offset += len(record["token"])
    return {"tokens": [r["token"] for r in records], "token_logprobs": [r["logprob"] for r in records],
            "top_logprobs": [dict(r.get("top_logprobs") or {}) for r in records], "text_offset": offsets}


def chat_logprobs(records: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The chat API's ``logprobs`` object (``content``: one entry per token) for ``records``."""
    def entry(token: str, logprob: float) -> dict[str, Any]:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

    return {"content": [{**entry(r["token"], r["logprob"]),
                         "top_logprobs": [entry(t, lp) for t, lp in (r.get("top_logprobs") or {}).items()]}
                        for r in records]}


@dataclass
class ChoiceRenderer:
    """Writes one response's chunks and body.

    Attributes:
        chat: chat completions (else completions).
        model: the ``model`` the request named (echoed in every chunk).
        response_id: the response's ``id``.
        prompt_lengths: characters of each prompt (completions' ``text_offset`` starts there).
        n: choices per prompt.
        logprobs: whether log-probabilities were asked for.
    """

    chat: bool
    model: str
    response_id: str
    prompt_lengths: list[int]
    n: int
    logprobs: bool = False
    created: int = field(default_factory=now)
    offsets: dict[int, int] = field(default_factory=lambda: defaultdict(int))

    def head(self, chunk: bool) -> dict[str, Any]:
        """``id``, ``object``, ``created`` and ``model`` of a chunk (or of the whole body)."""
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.response_id, "object": kind, "created": self.created, "model": self.model}

    def _logprobs(self, index: int, records: Sequence[dict[str, Any]] | None) -> dict[str, Any] | None:
        if not self.logprobs or records is None:
            return None
        if self.chat:
            return chat_logprobs(records)
        start = self.prompt_lengths[index // self.n] + self.offsets[index]
        return completion_logprobs(records, start)

    def opening(self, count: int) -> list[dict[str, Any]]:
        """The chunks that open a stream: for chat, the assistant role of each choice."""
        if not self.chat:
            return []
        return [{**self.head(True), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                  "logprobs": None, "finish_reason": None}]}
                for i in range(count)]

    def chunks(self, piece: Piece) -> list[dict[str, Any]]:
        """The streamed chunks for one piece (none for an empty piece that ends nothing)."""
        logprobs = self._logprobs(piece.index, piece.logprobs)
        self.offsets[piece.index] += len(piece.text)
        extra = {"fusekit": {"routed_to": piece.model}} if piece.model else {}
        if not self.chat:
            if not (piece.text or piece.finish_reason or logprobs or extra):
                return []
            choice = {"index": piece.index, "text": piece.text, "logprobs": logprobs,
                      "finish_reason": piece.finish_reason}
            return [{**self.head(True), "choices": [choice], **extra}]
        out = []
        if piece.text or logprobs or extra:
            choice = {"index": piece.index, "delta": {"content": piece.text}, "logprobs": logprobs,
                      "finish_reason": None}
            out.append({**self.head(True), "choices": [choice], **extra})
        if piece.finish_reason:
            choice = {"index": piece.index, "delta": {}, "logprobs": None,
                      "finish_reason": piece.finish_reason}
            out.append({**self.head(True), "choices": [choice]})
        return out

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]:
        """The last chunk of a stream with ``stream_options.include_usage``: no choices, the usage."""
        return {**self.head(True), "choices": [], "usage": usage}

    def choice(self, result: ChoiceResult) -> dict[str, Any]:
        """One collected choice."""
        self.offsets[result.index] = 0
        logprobs = self._logprobs(result.index, result.logprobs)
        routed = {"fusekit": {"routed_to": result.model}} if result.model else {}
        if self.chat:
            return {"index": result.index, "message": {"role": "assistant", "content": result.text},
                    "logprobs": logprobs, "finish_reason": result.finish_reason, **routed}
        return {"index": result.index, "text": result.text, "logprobs": logprobs,
                "finish_reason": result.finish_reason, **routed}


def completion_body(render: ChoiceRenderer, results: Sequence[ChoiceResult], usage: dict[str, int]
                    ) -> dict[str, Any]:
    """The whole (not streamed) response for collected ``results``."""
    body = {**render.head(False), "choices": [render.choice(r) for r in results], "usage": usage}
    routed = [r.model for r in results if r.model]
    if routed:
        body["fusekit"] = {"routed_to": routed[0]}
    return body
