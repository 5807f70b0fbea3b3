"""Helpers for the ``fusekit serve`` tests: a scripted fake backend and a server on a free port in a
thread (one per test module)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

from fusekit.serve.backends import Delta, NoChatTemplate, QueueFull, SamplingParams
from fusekit.serve.config import Limits

WORDS = [" alpha", " beta", " gamma", " delta", " eps", "\n", " zeta", " eta"]


class FakeBackend:
    """A backend whose text is a fixed function of the prompt and seed: token ``i`` of a prompt is
    ``WORDS[(len(prompt) + i) % 8]`` at temperature 0, a seeded choice otherwise.

    Args:
        name: the served name.
        kind: the backend kind (``router`` names a routed model on its first Delta: ``big`` below
            threshold 0.5, else ``small``).
        logprobs: whether it gives a distribution.
        chat: whether it has a chat template.
        delay: seconds per token.
        max_queue: requests it holds at once; more raise QueueFull.
    """

    def __init__(self, name: str, kind: str = "model", *, logprobs: bool = True, chat: bool = True,
                 delay: float = 0.0, max_queue: int = 1000) -> None:
        self.name, self.gives_logprobs = name, logprobs
        self.kind: Any = kind
        self.chat, self.delay, self.max_queue = chat, delay, max_queue
        self.active = 0
        self.started = 0
        self.finished = 0  # streams that ran to their last token
        self.closed_early = 0  # streams closed before their last token
        self.tokens = 0

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        if not self.chat:
            raise NoChatTemplate(f"model '{self.name}' has no chat template")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    def count_tokens(self, text: str) -> int:
        return 1 + len(text.split())

    def token(self, prompt: str, i: int, params: SamplingParams) -> int:
        if params.temperature == 0:
            return (len(prompt) + i) % len(WORDS)
        return hash((params.seed, prompt, i)) % len(WORDS) if params.seed is not None else i % 3

    async def stream(self, prompt: str, params: SamplingParams, *,
                     threshold: float | None = None) -> AsyncIterator[Delta]:
        if self.active >= self.max_queue:
            raise QueueFull(1.5)
        self.active += 1
        self.started += 1
        done = False
        try:
            for i in range(params.max_tokens):
                await asyncio.sleep(self.delay)
                token = self.token(prompt, i, params)
                self.tokens += 1
                logprobs = None
                if params.logprobs is not None:
                    top = {WORDS[(token + k) % len(WORDS)]: -1.0 - k for k in range(params.logprobs)}
                    logprobs = [{"token": WORDS[token], "logprob": -1.0, "top_logprobs": top}]
                routed = None
                if self.kind == "router" and i == 0:
                    routed = "big" if threshold is None or threshold < 0.5 else "small"
                last = i == params.max_tokens - 1
                yield Delta(WORDS[token], [token], logprobs, "length" if last else None, routed)
            done = True
        finally:
            self.active -= 1
            if done:
                self.finished += 1
            else:
                self.closed_early += 1

    def queue_depth(self) -> int:
        return self.active

    async def close(self) -> None:
        return None


def expected_text(prompt: str, max_tokens: int) -> str:
    """What FakeBackend writes for ``prompt`` at temperature 0."""
    return "".join(WORDS[(len(prompt) + i) % len(WORDS)] for i in range(max_tokens))


@contextmanager
def running_server(backends: Mapping[str, Any], *, limits: Limits | None = None,
                   api_key: str | None = None) -> Iterator[str]:
    """Serve ``backends`` on a free local port in a thread; yields the base URL (``http://.../v1``)."""
    from fusekit.serve.app import create_app
    from fusekit.serve.server import bind, make_server

    app = create_app(backends, limits=limits or Limits(), api_key=api_key)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    started = threading.Event()
    server = make_server(app, grace_seconds=2, on_started=started.set)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert started.wait(20), "the test server did not start"
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


def http(method: str, url: str, body: bytes | str | None = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request; (status, headers, body) whatever the status."""
    data = body.encode() if isinstance(body, str) else body
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in (headers or {}):
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


def post_json(url: str, payload: Any,
              headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], Any]:
    """POST ``payload`` as JSON; (status, headers, parsed body)."""
    status, head, raw = http("POST", url, json.dumps(payload), headers)
    return status, head, json.loads(raw) if raw.strip().startswith(b"{") else raw


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    """Poll ``condition()`` until true or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return bool(condition())
