"""Bad requests to ``fusekit serve``: each gets its 4xx status and OpenAI's error object, never a 500 with
a traceback. :data:`CASES` is the table (it is printed for the issue's closing note)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from serve_helpers import FakeBackend, http, running_server

pytest.importorskip("fastapi")

from fusekit.serve.backends import SamplingParams  # noqa: E402
from fusekit.serve.config import Limits  # noqa: E402

KEY = "k"
AUTH = {"Authorization": f"Bearer {KEY}"}
C, CHAT = "/v1/completions", "/v1/chat/completions"
OK = {"model": "fake", "prompt": "hello", "max_tokens": 2}
MSG = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

# (case, method, path, body: a dict sent as JSON or raw text, headers, expected status, expected param)
CASES: list[tuple[str, str, str, Any, dict[str, str], int, str | None]] = [
    ("unknown model", "POST", C, {**OK, "model": "gpt-9"}, AUTH, 404, "model"),
    ("empty model name", "POST", C, {**OK, "model": ""}, AUTH, 400, "model"),
    ("body is not JSON", "POST", C, "{model: fake", AUTH, 400, None),
    ("body is a JSON list", "POST", C, "[1, 2]", AUTH, 400, None),
    ("empty body", "POST", C, "", AUTH, 400, None),
    ("body not UTF-8", "POST", C, "\udcff", AUTH, 400, None),
    ("model missing", "POST", C, {"prompt": "x"}, AUTH, 400, "model"),
    ("prompt missing", "POST", C, {"model": "fake"}, AUTH, 400, "prompt"),
    ("prompt is a number", "POST", C, {**OK, "prompt": 5}, AUTH, 400, "prompt"),
    ("prompt is token ids", "POST", C, {**OK, "prompt": [1, 2, 3]}, AUTH, 400, "prompt"),
    ("prompt is an empty list", "POST", C, {**OK, "prompt": []}, AUTH, 400, "prompt"),
    ("max_tokens negative", "POST", C, {**OK, "max_tokens": -1}, AUTH, 400, "max_tokens"),
    ("max_tokens zero", "POST", C, {**OK, "max_tokens": 0}, AUTH, 400, "max_tokens"),
    ("max_tokens a string", "POST", C, {**OK, "max_tokens": "10"}, AUTH, 400, "max_tokens"),
    ("max_tokens a fraction", "POST", C, {**OK, "max_tokens": 1.5}, AUTH, 400, "max_tokens"),
    ("max_tokens above the limit", "POST", C, {**OK, "max_tokens": 65}, AUTH, 400, "max_tokens"),
    ("temperature NaN", "POST", C, '{"model": "fake", "prompt": "x", "temperature": NaN}', AUTH, 400,
     "temperature"),
    ("temperature Infinity", "POST", C, '{"model": "fake", "prompt": "x", "temperature": Infinity}', AUTH,
     400, "temperature"),
    ("temperature above 2", "POST", C, {**OK, "temperature": 2.5}, AUTH, 400, "temperature"),
    ("temperature negative", "POST", C, {**OK, "temperature": -0.1}, AUTH, 400, "temperature"),
    ("temperature a string", "POST", C, {**OK, "temperature": "hot"}, AUTH, 400, "temperature"),
    ("top_p zero", "POST", C, {**OK, "top_p": 0}, AUTH, 400, "top_p"),
    ("top_p above 1", "POST", C, {**OK, "top_p": 1.5}, AUTH, 400, "top_p"),
    ("n zero", "POST", C, {**OK, "n": 0}, AUTH, 400, "n"),
    ("n above 16", "POST", C, {**OK, "n": 17}, AUTH, 400, "n"),
    ("five stop strings", "POST", C, {**OK, "stop": ["a", "b", "c", "d", "e"]}, AUTH, 400, "stop"),
    ("empty stop string", "POST", C, {**OK, "stop": ""}, AUTH, 400, "stop"),
    ("stop a number", "POST", C, {**OK, "stop": 3}, AUTH, 400, "stop"),
    ("seed negative", "POST", C, {**OK, "seed": -1}, AUTH, 400, "seed"),
    ("logprobs above 20", "POST", C, {**OK, "logprobs": 21}, AUTH, 400, "logprobs"),
    ("logprobs from a model without a distribution", "POST", C, {**OK, "model": "plain", "logprobs": 1}, AUTH,
     400, "logprobs"),
    ("unknown field", "POST", C, {**OK, "temprature": 0.5}, AUTH, 400, "temprature"),
    ("stream not a boolean", "POST", C, {**OK, "stream": "yes"}, AUTH, 400, "stream"),
    ("stream_options without stream", "POST", C, {**OK, "stream_options": {"include_usage": True}}, AUTH, 400,
     "stream_options"),
    ("echo", "POST", C, {**OK, "echo": True}, AUTH, 400, "echo"),
    ("presence penalty", "POST", C, {**OK, "presence_penalty": 0.5}, AUTH, 400, "presence_penalty"),
    ("logit_bias", "POST", C, {**OK, "logit_bias": {"5": 10}}, AUTH, 400, "logit_bias"),
    ("best_of other than n", "POST", C, {**OK, "best_of": 3}, AUTH, 400, "best_of"),
    ("prompt above the token limit", "POST", C, {**OK, "prompt": "w " * 60}, AUTH, 400, "prompt"),
    ("body above the byte limit", "POST", C, {**OK, "prompt": "w" * 5000}, AUTH, 413, None),
    ("router threshold above 1", "POST", C, {**OK, "model": "router-rt-1.5"}, AUTH, 400, "model"),
    ("router threshold on a model", "POST", C, {**OK, "model": "router-fake-0.5"}, AUTH, 404, "model"),
    ("chat: messages missing", "POST", CHAT, {"model": "fake"}, AUTH, 400, "messages"),
    ("chat: no messages", "POST", CHAT, {**MSG, "messages": []}, AUTH, 400, "messages"),
    ("chat: unknown role", "POST", CHAT, {**MSG, "messages": [{"role": "robot", "content": "x"}]}, AUTH, 400,
     "messages.0.role"),
    ("chat: content a number", "POST", CHAT, {**MSG, "messages": [{"role": "user", "content": 5}]}, AUTH, 400,
     "messages.0.content"),
    ("chat: image content", "POST", CHAT, {**MSG, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x"}}]}]}, AUTH, 400, "messages.0.content"),
    ("chat: model without a chat template", "POST", CHAT, {**MSG, "model": "plain"}, AUTH, 400, "model"),
    ("chat: top_logprobs without logprobs", "POST", CHAT, {**MSG, "top_logprobs": 2}, AUTH, 400,
     "top_logprobs"),
    ("chat: max_completion_tokens negative", "POST", CHAT, {**MSG, "max_completion_tokens": -5}, AUTH, 400,
     "max_completion_tokens"),
    ("chat: tools", "POST", CHAT, {**MSG, "tools": [{"type": "function"}]}, AUTH, 400, "tools"),
    ("no API key", "POST", C, OK, {}, 401, None),
    ("wrong API key", "POST", C, OK, {"Authorization": "Bearer nope"}, 401, None),
    ("models without a key", "GET", "/v1/models", None, {}, 401, None),
    ("unknown route", "POST", "/v1/embeddings", OK, AUTH, 404, None),
    ("wrong method", "GET", C, None, AUTH, 405, None),
    ("unexpected backend failure", "POST", C, {**OK, "model": "broken"}, AUTH, 500, None),
]


class BrokenBackend(FakeBackend):
    """A backend with a bug: the server must answer 500 with an error object and no traceback."""

    async def stream(self, prompt: str, params: SamplingParams, *,
                     threshold: float | None = None) -> AsyncIterator[Any]:
        raise RuntimeError("an internal bug with a secret path /home/x")
        yield  # pragma: no cover


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    backends = {"fake": FakeBackend("fake"), "plain": FakeBackend("plain", logprobs=False, chat=False),
                "rt": FakeBackend("rt", "router"), "broken": BrokenBackend("broken")}
    limits = Limits(max_tokens_limit=64, max_prompt_tokens=50, max_body_bytes=4096)
    with running_server(backends, limits=limits, api_key=KEY) as url:
        yield url[:-3]


def test_the_table_has_enough_cases() -> None:
    assert len(CASES) >= 25 and len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize(("case", "method", "path", "body", "headers", "status", "param"), CASES,
                         ids=[c[0] for c in CASES])
def test_bad_request_gets_an_openai_error(server: str, case: str, method: str, path: str, body: Any,
                                          headers: dict[str, str], status: int, param: str | None) -> None:
    raw = body if isinstance(body, str) or body is None else json.dumps(body)
    data = raw.encode("utf-8", "surrogateescape") if raw is not None else None
    got, head, answer = http(method, server + path, data, {"Content-Type": "application/json", **headers})
    assert got == status, (case, answer)
    assert b"Traceback" not in answer and b"secret path" not in answer
    error = json.loads(answer)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["type"]
    assert "\n" not in error["message"]
    if param is not None:
        assert error["param"] == param, (case, error)
    if status == 404 and path == C:
        assert error["code"] == "model_not_found"
