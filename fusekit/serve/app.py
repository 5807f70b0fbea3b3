"""The FastAPI application: OpenAI's completions and chat completions over fusekit backends.

Routes: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (streamed as
server-sent events with ``stream: true``), ``GET /health`` (no key needed) and ``GET /metrics``
(Prometheus text). With an API key every route but ``/health`` wants ``Authorization: Bearer KEY``.

A router answers under its own name; ``router-NAME-THRESHOLD`` (RouteLLM's convention) asks router
NAME to route at THRESHOLD instead of its calibrated one. The model that answered is in the response
(``"fusekit": {"routed_to": ...}``, also on each choice) and in the ``X-Fusekit-Routed-To`` header.

Every refusal is OpenAI's error object (:mod:`fusekit.serve.errors`). Once the server is draining
(SIGTERM), new requests get 503 while those in flight finish.

Example:
    >>> app = create_app({"m": backend}, limits=Limits())  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request
from pydantic import ValidationError
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from fusekit.errors import FusekitError
from fusekit.serve.choices import ChoiceJob, Piece, Tally, collect, merge_pieces, seeded
from fusekit.serve.config import Limits
from fusekit.serve.errors import ApiError, error_body, install_handlers, logger, validation_message
from fusekit.serve.metrics import Metrics
from fusekit.serve.protocol import ChatRequest, CompletionRequest, new_id, now
from fusekit.serve.render import ChoiceRenderer, completion_body, usage_body

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from fusekit.serve.backends import Backend

__all__ = ["ServerState", "create_app", "resolve_model"]

ROUTED_HEADER = "X-Fusekit-Routed-To"
_ROUTES = ("/v1/models", "/v1/completions", "/v1/chat/completions", "/health", "/metrics")
_ROUTER_NAME = re.compile(r"^router-(?P<name>.+)-(?P<threshold>[0-9]*\.?[0-9]+(?:[eE]-?[0-9]+)?)$")


@dataclass
class ServerState:
    """What every route reads: the backends by served name, the limits, the key, the counters.

    Attributes:
        draining: set when the server stops accepting requests (SIGTERM).
    """

    backends: Mapping[str, Backend]
    limits: Limits
    api_key: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    draining: bool = False
    created: int = field(default_factory=now)


def create_app(backends: Mapping[str, Backend], *, limits: Limits, api_key: str | None = None,
               metrics: Metrics | None = None) -> FastAPI:
    """The application serving ``backends`` under their names.

    Args:
        backends: the loaded backends, by served name.
        limits: per-request limits (prompt tokens, ``max_tokens``, body size).
        api_key: when set, every route but ``/health`` needs ``Authorization: Bearer <api_key>``.
        metrics: the counters to update (a fresh set by default).

    Returns:
        The FastAPI app; ``app.state.fusekit`` is its :class:`ServerState`.
    """
    state = ServerState(dict(backends), limits, api_key, metrics or Metrics())
    app = FastAPI(title="fusekit", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.fusekit = state
    install_handlers(app)
    _add_routes(app, state)
    app.add_middleware(_Gate, state=state)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    auth = [Depends(_authorizer(state))]

    @app.get("/health")
    async def health() -> Response:
        body = {"status": "draining" if state.draining else "ok", "models": sorted(state.backends)}
        return JSONResponse(body, status_code=503 if state.draining else 200)

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        depths = {name: backend.queue_depth() for name, backend in state.backends.items()}
        return PlainTextResponse(state.metrics.render(depths), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models", dependencies=auth)
    async def models() -> Response:
        data = [_model_card(name, backend, state.created) for name, backend in state.backends.items()]
        return JSONResponse({"object": "list", "data": data})

    @app.get("/v1/models/{model_id:path}", dependencies=auth)
    async def model(model_id: str) -> Response:
        backend, _ = resolve_model(state, model_id)
        return JSONResponse(_model_card(model_id, backend, state.created))

    @app.post("/v1/completions", dependencies=auth)
    async def completions(request: Request) -> Response:
        body = _parse(CompletionRequest, await _read_json(request, state.limits.max_body_bytes))
        assert isinstance(body, CompletionRequest)
        return await _answer(request, state, body, chat=False)

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(request: Request) -> Response:
        body = _parse(ChatRequest, await _read_json(request, state.limits.max_body_bytes))
        assert isinstance(body, ChatRequest)
        return await _answer(request, state, body, chat=True)


def _model_card(name: str, backend: Backend, created: int) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": created, "owned_by": "fusekit",
            "fusekit": {"kind": backend.kind, "logprobs": backend.gives_logprobs}}


def _authorizer(state: ServerState) -> Any:
    async def check(request: Request) -> None:
        if state.api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ApiError(401, "missing API key; send the header Authorization: Bearer KEY",
                           code="missing_api_key")
        if not secrets.compare_digest(token.strip().encode(), state.api_key.encode()):
            raise ApiError(401, "incorrect API key", code="invalid_api_key")
    return check


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing more than ``limit`` bytes (413)."""
    too_big = ApiError(413, f"the request body is larger than {limit} bytes; send a smaller request",
                       code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}",
                       code="invalid_json")
    return data


def _parse(model: type[CompletionRequest | ChatRequest],
           data: dict[str, Any]) -> CompletionRequest | ChatRequest:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = validation_message(exc.errors())
        raise ApiError(400, message, param=param) from None


def resolve_model(state: ServerState, name: str) -> tuple[Backend, float | None]:
    """The backend a request's ``model`` names, and the routing threshold it asks for.

    ``router-NAME-THRESHOLD`` names router ``NAME`` at ``THRESHOLD`` (in [0, 1]).

    Raises:
        ApiError: 404 ``model_not_found`` for a name that is not served; 400 for a threshold out of range.
    """
    if name in state.backends:
        return state.backends[name], None
    found = _ROUTER_NAME.match(name)
    if found and found["name"] in state.backends and state.backends[found["name"]].kind == "router":
        threshold = float(found["threshold"])
        if not 0.0 <= threshold <= 1.0:
            raise ApiError(400, f"model {name!r}: the threshold {threshold:g} must be in [0, 1]",
                           param="model")
        return state.backends[found["name"]], threshold
    served = ", ".join(sorted(state.backends))
    raise ApiError(404, f"the model {name!r} does not exist; this server serves: {served}",
                   param="model", code="model_not_found")


@dataclass
class _Plan:
    """One request, checked and ready to run."""

    backend: Backend
    jobs: list[ChoiceJob]
    prompt_tokens: int
    prompt_lengths: list[int]
    logprobs: bool


def _plan(state: ServerState, body: CompletionRequest | ChatRequest, chat: bool) -> _Plan:
    from fusekit.serve.backends import NoChatTemplate, SamplingParams

    backend, threshold = resolve_model(state, body.model)
    if isinstance(body, ChatRequest):
        try:
            prompts = [backend.chat_prompt(body.chat_messages())]
        except NoChatTemplate as exc:
            raise ApiError(400, str(exc), param="model", code="no_chat_template") from None
        top = (body.top_logprobs or 0) if body.logprobs else None
        requested, default = body.requested_tokens(), min(256, state.limits.max_tokens_limit)
    else:
        prompts, top, requested, default = body.prompts(), body.logprobs, body.max_tokens, 16
    if top is not None and not backend.gives_logprobs:
        raise ApiError(400, f"model {body.model!r} ({backend.kind}) gives no token distribution, so no "
                       "logprobs; leave logprobs out", param="top_logprobs" if chat else "logprobs")
    max_tokens = _max_tokens(state.limits, requested, default, chat)
    counts = [_prompt_tokens(state.limits, backend, p, "messages" if chat else "prompt") for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p,
                            seed=body.seed, stop=body.stop_strings(), logprobs=top)
    jobs = [ChoiceJob(i * body.n + j, prompt, seeded(params, j), threshold)
            for i, prompt in enumerate(prompts) for j in range(body.n)]
    return _Plan(backend, jobs, sum(counts), [len(p) for p in prompts], top is not None)


def _max_tokens(limits: Limits, requested: int | None, default: int, chat: bool) -> int:
    if requested is None:
        return min(default, limits.max_tokens_limit)
    if requested > limits.max_tokens_limit:
        raise ApiError(400, f"max_tokens {requested} is above this server's limit of "
                       f"{limits.max_tokens_limit}",
                       param="max_completion_tokens" if chat else "max_tokens")
    return requested


def _prompt_tokens(limits: Limits, backend: Backend, prompt: str, param: str) -> int:
    count = backend.count_tokens(prompt)
    if count > limits.max_prompt_tokens:
        raise ApiError(400, f"the prompt has {count} tokens, more than this server's limit of "
                       f"{limits.max_prompt_tokens}; shorten it", param=param, code="context_length_exceeded")
    return count


async def _answer(request: Request, state: ServerState, body: CompletionRequest | ChatRequest,
                  chat: bool) -> Response:
    """Run a checked request. A streamed answer starts once its first piece is there, so that a full
    queue is still a 429 and a router's choice can go in the headers. A client that leaves while its
    request waits or decodes cancels it."""
    plan = _plan(state, body, chat)
    tally = Tally()
    pieces = merge_pieces(plan.backend, plan.jobs, tally)
    render = ChoiceRenderer(chat=chat, model=body.model, response_id=new_id("chatcmpl" if chat else "cmpl"),
                            prompt_lengths=plan.prompt_lengths, n=body.n, logprobs=plan.logprobs)
    try:
        if body.stream:
            first = await _until_disconnect(request, _next_piece(pieces))
        else:
            results = await _until_disconnect(request, collect(pieces, len(plan.jobs)))
    except Exception as exc:
        await pieces.aclose()  # type: ignore[attr-defined]
        _count_tokens(state, plan, tally)
        raise _api_error(exc) from None
    if body.stream:
        headers = {ROUTED_HEADER: first.model} if first.model else {}
        events = _events(state, body, plan, tally, render, first, pieces)
        return StreamingResponse(events, media_type="text/event-stream",
                                 headers={**headers, "Cache-Control": "no-cache"})
    _count_tokens(state, plan, tally)
    response = completion_body(render, results, usage_body(plan.prompt_tokens, tally.completion_tokens))
    routed = sorted({r.model for r in results if r.model})
    return JSONResponse(response, headers={ROUTED_HEADER: ", ".join(routed)} if routed else {})


async def _next_piece(pieces: AsyncIterator[Piece]) -> Piece:
    return await pieces.__anext__()


def _api_error(exc: Exception) -> Exception:
    """A backend's refusal as the API error it answers with: a full queue is 429 with ``Retry-After``,
    a request the backend cannot take (a prompt longer than the context) is 400; anything else is
    returned as it is (a bug: 500)."""
    from fusekit.serve.backends import QueueFull

    if isinstance(exc, QueueFull):
        wait = max(1, math.ceil(exc.retry_after))
        return ApiError(429, f"the server is busy ({exc}); retry later", code="queue_full",
                        headers={"Retry-After": str(wait)})
    if isinstance(exc, FusekitError):
        return ApiError(400, str(exc))
    return exc


async def _prepend(first: Piece, pieces: AsyncIterator[Piece]) -> AsyncIterator[Piece]:
    try:
        yield first
        async for piece in pieces:
            yield piece
    finally:
        await pieces.aclose()  # type: ignore[attr-defined]


def _count_tokens(state: ServerState, plan: _Plan, tally: Tally) -> None:
    state.metrics.add_tokens(plan.backend.name, prompt=plan.prompt_tokens, completion=tally.completion_tokens)


async def _until_disconnect(request: Request, work: Any) -> Any:
    """Await ``work`` unless the client goes away first; then cancel it (its generation stops)."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task  # its generators are closed (and the generation stopped) before going on
    if task.cancelled():
        raise ApiError(499, "the client closed the request")
    return task.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _events(state: ServerState, body: CompletionRequest | ChatRequest, plan: _Plan, tally: Tally,
                  render: ChoiceRenderer, first: Piece, pieces: AsyncIterator[Piece]) -> AsyncIterator[str]:
    """The server-sent events of a streamed answer: chunks, a usage chunk if asked for, ``[DONE]``."""
    try:
        for chunk in render.opening(len(plan.jobs)):
            yield _event(chunk)
        async for piece in _prepend(first, pieces):
            for chunk in render.chunks(piece):
                yield _event(chunk)
        if body.include_usage():
            yield _event(render.usage_chunk(usage_body(plan.prompt_tokens, tally.completion_tokens)))
        yield "data: [DONE]\n\n"
    except Exception as exc:  # after the headers went out: an error event ends the stream
        error = _api_error(exc)
        if not isinstance(error, ApiError):
            logger.error("internal error while streaming", exc_info=exc)
            error = ApiError(500, "internal server error; the server log has the details")
        yield _event(error_body(error))
    finally:
        _count_tokens(state, plan, tally)


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class _Gate:
    """ASGI middleware: refuses requests with 503 once the server drains, counts every request and its
    latency by route and status (a streamed answer's latency runs to its last byte)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in _ROUTES or path.startswith("/v1/models/") else "other"
        route = "/v1/models/{id}" if route.startswith("/v1/models/") else route
        if self.state.draining and path != "/health":
            error = ApiError(503, "the server is shutting down and takes no new requests; retry on another "
                             "instance", code="shutting_down", headers={"Connection": "close"})
            await JSONResponse(error_body(error), 503, headers=error.headers)(scope, receive, send)
            self.state.metrics.observe_request(route, 503, 0.0)
            return
        await self._counted(route, scope, receive, send)

    async def _counted(self, route: str, scope: Scope, receive: Receive, send: Send) -> None:
        started, status = time.perf_counter(), [499]
        metrics = self.state.metrics

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        metrics.in_flight += 1
        try:
            await self.app(scope, receive, counting_send)
        finally:
            metrics.in_flight -= 1
            metrics.observe_request(route, status[0], time.perf_counter() - started)
