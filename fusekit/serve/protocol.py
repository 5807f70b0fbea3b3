"""The OpenAI request bodies the server takes, checked strictly, and the response bodies it writes.

Requests are pydantic models with ``extra="forbid"`` and strict types: ``"1"`` is no number, ``NaN`` no
temperature, and a field the server does not know is refused (as OpenAI's API refuses it) rather than
silently ignored. Fields of the API that fusekit cannot honour (``echo``, penalties, ``logit_bias``,
``suffix``) are taken at their neutral value only, and refused with a message otherwise.

Example:
    >>> CompletionRequest.model_validate({"model": "m", "prompt": "def", "max_tokens": 4}).stop_strings()
    ()
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = ["ChatMessage", "ChatRequest", "CompletionRequest", "MAX_N", "MAX_SEED", "MAX_TOP_LOGPROBS",
           "message_text", "new_id"]

MAX_N = 16
"""The most choices (``n``) one request may ask for."""
MAX_TOP_LOGPROBS = 20
"""The most alternatives per token ``logprobs`` / ``top_logprobs`` may ask for (OpenAI's own limit)."""
MAX_SEED = 2**63 - 1 - MAX_N
"""Seeds run up to seed + n - 1, which must still fit a signed 64-bit integer."""
MAX_STOP = 4

Fraction = Annotated[float, Field(allow_inf_nan=False)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class StreamOptions(_Strict):
    """``stream_options``: whether the last streamed chunk carries ``usage``."""

    include_usage: bool = False


class _Sampling(_Strict):
    """The fields completions and chat completions share."""

    model: str = Field(min_length=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    user: str | None = None
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, value: str | list[str] | None) -> str | list[str] | None:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop strings, got {len(stops)}")
        if any(not s for s in stops):
            raise ValueError("a stop string must not be empty")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float) -> float:
        if value != 0:
            raise ValueError("penalties are not supported by this server; leave it at 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value:
            raise ValueError("logit_bias is not supported by this server; leave it out")
        return value

    def stop_strings(self) -> tuple[str, ...]:
        """``stop`` as a tuple (a single string is one stop string)."""
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())

    def include_usage(self) -> bool:
        """Whether a streamed answer ends with a chunk carrying ``usage``."""
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_stream_options(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options: only allowed with stream: true")


class CompletionRequest(_Sampling):
    """``POST /v1/completions``. ``max_tokens`` defaults to 16, as in OpenAI's API."""

    prompt: str | list[str]
    max_tokens: int | None = Field(default=None, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("give at least one prompt")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool) -> bool:
        if value:
            raise ValueError("echo is not supported by this server; leave it out")
        return value

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        if value:
            raise ValueError("suffix (insertion) is not supported by this server; leave it out")
        return value

    @model_validator(mode="after")
    def _cross(self) -> CompletionRequest:
        self._check_stream_options()
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError(f"best_of: only best_of == n is supported, got best_of {self.best_of}, "
                             f"n {self.n}")
        return self

    def prompts(self) -> list[str]:
        """The prompts, one or several."""
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class TextPart(_Strict):
    """One part of a message's content; only text is served."""

    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    """One chat message."""

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


def message_text(message: ChatMessage) -> str:
    """A message's content as plain text (text parts joined)."""
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    return "".join(part.text for part in message.content)


class ChatRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)

    @model_validator(mode="after")
    def _cross(self) -> ChatRequest:
        self._check_stream_options()
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        return self

    def requested_tokens(self) -> int | None:
        """``max_completion_tokens`` (the newer name) or ``max_tokens``."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def chat_messages(self) -> list[dict[str, Any]]:
        """The messages as the plain dicts a chat template reads."""
        return [{"role": m.role, "content": message_text(m)} for m in self.messages]


def new_id(prefix: str) -> str:
    """A fresh response id such as ``cmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    """The ``created`` timestamp: Unix seconds."""
    return int(time.time())
