"""Time limits for Hub requests, so that no server can make fusekit hang.

Three limits, each from the environment (seconds; positive, finite numbers):

- ``FUSEKIT_HUB_REQUEST_TIMEOUT`` (default 60): how long one request may wait to connect, to send
  or for the next bytes of the answer.
- ``FUSEKIT_HUB_TIMEOUT`` (default 10 minutes plus 2 s per MiB to upload): the whole push, retries
  included.
- ``FUSEKIT_HUB_RETRY_DELAY`` (default 2; zero allowed): the first pause between attempts.

huggingface_hub sends every request through one shared httpx client made by a factory
(``huggingface_hub.set_client_factory``). :func:`limited_session` installs, for the length of a push,
a factory whose client has those timeouts and an event hook that shortens each request's timeouts to
the time left, refuses any request once the deadline has passed or the push was abandoned, and stops
a response whose body still trickles in at the deadline. A server that drips its headers a byte at
a time defeats per-read timeouts, so :func:`run_within` runs the push in a worker thread and waits
for it no longer than the deadline.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import httpx2

from fusekit.errors import FusekitError

TIMEOUT_ENV = "FUSEKIT_HUB_TIMEOUT"
REQUEST_TIMEOUT_ENV = "FUSEKIT_HUB_REQUEST_TIMEOUT"
RETRY_DELAY_ENV = "FUSEKIT_HUB_RETRY_DELAY"
DEFAULT_REQUEST_TIMEOUT = 60.0
DEFAULT_RETRY_DELAY = 2.0
CONNECT_TIMEOUT = 10.0  # at most; a Hub that takes longer to accept a connection is not answering
BASE_DEADLINE = 600.0
SECONDS_PER_MIB = 2.0  # the default deadline allows uploads as slow as 512 KiB/s
T = TypeVar("T")


class DeadlineExceeded(Exception):
    """Raised inside huggingface_hub's calls once the push's time is up.

    It is not an httpx error, so huggingface_hub's own retry loop lets it through at once.
    """


def env_seconds(name: str, default: float, *, allow_zero: bool = False) -> float:
    """A number of seconds from the environment variable ``name``, or ``default`` when unset.

    Args:
        name: the variable, e.g. ``FUSEKIT_HUB_TIMEOUT``.
        default: the value when the variable is unset or empty.
        allow_zero: accept 0 (a retry delay may be zero; a timeout may not).

    Returns:
        The number of seconds.

    Raises:
        FusekitError: the value is not a number, is NaN or infinite, negative, or zero where
            that is not allowed.
    """
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    return check_seconds(name, value, default, allow_zero=allow_zero, shown=f"{name}={raw!r}")


def check_seconds(name: str, value: float, default: float, *, allow_zero: bool = False,
                  shown: str | None = None) -> float:
    """``value`` when it is a finite number of seconds above zero (or zero, with ``allow_zero``).

    Raises:
        FusekitError: naming ``name`` (or ``shown``), the value, and what to write instead.
    """
    low_ok = value >= 0 if allow_zero else value > 0
    if not math.isfinite(value) or not low_ok:
        what = "zero or a positive number" if allow_zero else "a positive number"
        raise FusekitError(f"{shown or f'{name}={value!r}'} is not a valid number of seconds; set it "
                           f"to {what} (e.g. {default:g}) or unset it")
    return value


def default_deadline(upload_bytes: int) -> float:
    """The default time for a whole push: 10 minutes plus 2 s per MiB to upload."""
    return BASE_DEADLINE + SECONDS_PER_MIB * upload_bytes / 2**20


@dataclass
class Deadline:
    """The time limits of one push, and a flag that abandons it.

    Args:
        seconds: the time the whole push may take.
        request_timeout: the time one request may wait to connect, send or receive.
    """

    seconds: float
    request_timeout: float
    start: float = field(default_factory=time.monotonic)
    abandoned: threading.Event = field(default_factory=threading.Event)

    def remaining(self) -> float:
        """Seconds left; zero or less once the deadline has passed."""
        return self.start + self.seconds - time.monotonic()

    @property
    def over(self) -> bool:
        """Whether the deadline has passed or the push was abandoned."""
        return self.remaining() <= 0 or self.abandoned.is_set()

    def check(self) -> float:
        """The seconds left; :class:`DeadlineExceeded` when none are, or the push was abandoned."""
        left = self.remaining()
        if left <= 0 or self.abandoned.is_set():
            raise DeadlineExceeded(f"the {self.seconds:g} s allowed for this push are over")
        return left

    def sleep(self, seconds: float) -> bool:
        """Pause up to ``seconds``; False (at once) when the pause would pass the deadline."""
        if seconds >= self.remaining():
            return False
        return not self.abandoned.wait(seconds)

    def on_request(self, request: httpx2.Request) -> None:
        """httpx request hook: refuse late requests, cut every timeout to the time left."""
        left = self.check()
        timeouts = dict(request.extensions.get("timeout") or {})
        for key in ("connect", "read", "write", "pool"):
            limit = timeouts.get(key)
            limit = self.request_timeout if limit is None else min(limit, self.request_timeout)
            timeouts[key] = min(limit, left)
        request.extensions["timeout"] = timeouts

    def on_response(self, response: httpx2.Response) -> None:
        """httpx response hook: the body is read in chunks, each only before the deadline."""
        if isinstance(response.stream, httpx2.SyncByteStream):  # the async client is left alone
            response.stream = _DeadlineStream(response.stream, self)


class _DeadlineStream(httpx2.SyncByteStream):
    """A response body that stops with :class:`DeadlineExceeded` once the deadline has passed."""

    def __init__(self, stream: httpx2.SyncByteStream, deadline: Deadline) -> None:
        self._stream = stream
        self._deadline = deadline

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._stream:
            self._deadline.check()
            yield chunk

    def close(self) -> None:
        self._stream.close()


@contextmanager
def limited_session(deadline: Deadline) -> Iterator[None]:
    """Give huggingface_hub's shared HTTP client the deadline's timeouts and hooks for a while.

    The factory in place before (huggingface_hub's default, or one the caller set) still makes
    the client; it is put back afterwards. The client is shared by the whole process: run the
    push inside this block (in the worker of :func:`run_within`), so that the limits stay until
    an abandoned push has really stopped.
    """
    from huggingface_hub.utils import _http, set_client_factory

    previous: Callable[[], Any] = getattr(_http, "_GLOBAL_CLIENT_FACTORY", _http.default_client_factory)

    def make_client() -> Any:
        client = previous()
        client.timeout = httpx2.Timeout(deadline.request_timeout,
                                        connect=min(CONNECT_TIMEOUT, deadline.request_timeout))
        hooks = client.event_hooks
        client.event_hooks = {"request": [*hooks["request"], deadline.on_request],
                              "response": [*hooks["response"], deadline.on_response]}
        return client

    set_client_factory(make_client)
    try:
        yield
    finally:
        set_client_factory(previous)


def run_within(deadline: Deadline, work: Callable[[], T]) -> T:
    """Run ``work`` in a worker thread and wait for it until the deadline.

    Returns:
        What ``work`` returned.

    Raises:
        DeadlineExceeded: the deadline passed first; the worker is abandoned (its next request is
            refused) and left to end on its own.
        BaseException: whatever ``work`` raised.
    """
    outcome: list[Any] = []
    muted = _Muted()

    def target() -> None:
        try:
            outcome.append((True, work()))
        except BaseException as exc:  # handed to the waiting thread
            outcome.append((False, exc))
        finally:
            muted.restore()

    worker = threading.Thread(target=target, name="fusekit-hub-push", daemon=True)
    worker.start()
    try:
        while worker.is_alive() and deadline.remaining() > 0:
            worker.join(min(0.25, max(deadline.remaining(), 0.0)))  # short waits: Ctrl-C stays prompt
    finally:
        if worker.is_alive():  # abandoned: it stops at its next request, and says nothing more
            deadline.abandoned.set()
            muted.mute()
            if not worker.is_alive():  # it ended meanwhile, perhaps before muting: undo it here
                muted.restore()
    if not outcome:
        raise DeadlineExceeded(f"the {deadline.seconds:g} s allowed for this push are over")
    ok, value = outcome[0]
    if ok:
        return value
    raise value


class _Muted:
    """Silences huggingface_hub's log (its retry warnings) while an abandoned push winds down, so
    that the error line stays the last thing printed; the level is restored when the worker ends."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._level: int | None = None

    def mute(self) -> None:
        hub_log = logging.getLogger("huggingface_hub")
        with self._lock:
            if self._level is None:
                self._level = hub_log.level
                hub_log.setLevel(logging.CRITICAL)

    def restore(self) -> None:
        with self._lock:
            if self._level is not None:
                logging.getLogger("huggingface_hub").setLevel(self._level)
                self._level = None
