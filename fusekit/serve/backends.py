"""What the server serves: a model, an ensemble or a router behind one streaming interface.

:func:`load_backend` loads a served name at start (a load failure is one :class:`FusekitError`
line, before the first request):

- ``model`` (or ``adapter``): any model reference :func:`fusekit.lm.load.load_lm` accepts (folder,
  merged output, Hub id, ``base+adapter``); requests are batched dynamically
  (:mod:`fusekit.serve.batcher`) and decode exactly as :func:`fusekit.lm.generate.generate` does.
- ``ensemble``: an ensemble recipe; each request runs :meth:`fusekit.ensemble.Ensemble.generate`
  (the text ``fusekit ensemble generate`` prints), one at a time in a worker thread.
- ``router``: a router folder; the router (:meth:`fusekit.route.router.Router.route`) picks a model
  for the prompt, as ``fusekit route run`` does, and that model's batched backend answers; the
  first Delta names the model.

Every backend's :meth:`stream` is an async generator of :class:`Delta`; closing it cancels the
request and frees its slot.

Example:
    >>> backend = load_backend("python", "model", "demo-out/experts/python")  # doctest: +SKIP
    >>> async for delta in backend.stream("def fib(", SamplingParams(max_tokens=16)):  # doctest: +SKIP
    ...     print(delta.text, end="")
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, Protocol

from fusekit.errors import FusekitError
from fusekit.serve.batcher import (
    BatchWorker,
    Delta,
    NoChatTemplate,
    QueueFull,
    Request,
    RequestQueue,
    SamplingParams,
    SerialWorker,
    stream_request,
)
from fusekit.serve.stops import first_stop

__all__ = ["Backend", "Delta", "EnsembleBackend", "ModelBackend", "NoChatTemplate", "QueueFull",
           "RouterBackend", "SamplingParams", "load_backend"]

Kind = Literal["model", "adapter", "ensemble", "router"]


class Backend(Protocol):
    """One served name."""

    name: str
    kind: Kind
    gives_logprobs: bool

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def stream(self, prompt: str, params: SamplingParams, *,
               threshold: float | None = None) -> AsyncIterator[Delta]: ...

    def queue_depth(self) -> int: ...

    async def close(self) -> None: ...


def chat_prompt_of(tokenizer: Any, name: str, messages: list[dict[str, Any]]) -> str:
    """``messages`` rendered by ``tokenizer``'s chat template, ready for the assistant's turn.

    Raises:
        NoChatTemplate: the tokenizer has none.
    """
    if not getattr(tokenizer, "chat_template", None):
        raise NoChatTemplate(f"model '{name}' has no chat template; use /v1/completions with a plain "
                             "prompt, or serve a model whose tokenizer has a chat_template")
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


class ModelBackend:
    """One loaded model with a dynamic-batching decode thread.

    Args:
        name: the served name.
        lm: the model (:class:`fusekit.lm.LoadedLM`, with its tokenizer).
        max_batch: most requests decoded together.
        max_queue: most requests waiting; more are refused with :class:`QueueFull`.
        batch_wait_ms: how long the worker waits for batch mates once a request arrives.
    """

    gives_logprobs = True

    def __init__(self, name: str, lm: Any, *, max_batch: int = 16, max_queue: int = 64,
                 batch_wait_ms: float = 5.0) -> None:
        from fusekit.lm.score import max_context

        self.name = name
        self.kind: Kind = "adapter" if lm.resolved.adapter is not None else "model"
        self.lm = lm
        self.context = max_context(lm)
        self.queue = RequestQueue(max_queue, max_batch)
        self.worker = BatchWorker(lm, self.queue, batch_wait_ms=batch_wait_ms)

    def prompt_ids(self, prompt: str) -> list[int]:
        """``[BOS] + tokens`` as :func:`fusekit.lm.generate.prompt_ids` reads a prompt (a prompt that
        already starts with the BOS text, as chat templates write it, gets no second one)."""
        from fusekit.lm.generate import prompt_ids

        bos = self.lm.tokenizer.bos_token
        if isinstance(bos, str) and bos and prompt.startswith(bos):
            prompt = prompt[len(bos):]
        return prompt_ids(self.lm, prompt)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """See :func:`chat_prompt_of`."""
        return chat_prompt_of(self.lm.tokenizer, self.name, messages)

    def count_tokens(self, text: str) -> int:
        """Tokens the model reads for ``text`` as a prompt (BOS included)."""
        return len(self.prompt_ids(text))

    async def stream(self, prompt: str, params: SamplingParams, *,
                     threshold: float | None = None) -> AsyncIterator[Delta]:
        """Continue ``prompt``; Deltas as tokens are decoded (``threshold`` is for routers).

        Raises:
            QueueFull: too many requests are waiting.
            FusekitError: ``max_tokens`` below 1, or the prompt plus ``max_tokens`` exceeds the
                model's context.
        """
        if params.max_tokens < 1:
            raise FusekitError(f"max_tokens {params.max_tokens}: must be at least 1")
        ids = self.prompt_ids(prompt)
        if len(ids) + params.max_tokens > self.context:
            raise FusekitError(f"the prompt's {len(ids)} tokens plus max_tokens {params.max_tokens} exceed "
                               f"model '{self.name}''s context of {self.context}; shorten the prompt or "
                               "lower max_tokens")
        request = Request(ids, prompt, params, asyncio.get_running_loop())
        async for delta in stream_request(self.queue, request):
            yield delta

    def queue_depth(self) -> int:
        """Requests accepted and not finished (waiting or decoding)."""
        return self.queue.depth()

    async def close(self) -> None:
        """Finish queued requests and stop the decode thread."""
        self.queue.close()
        await asyncio.to_thread(self.worker.thread.join)


class EnsembleBackend:
    """An ensemble recipe: each request is one :meth:`~fusekit.ensemble.Ensemble.generate` call in a
    worker thread, one at a time; its answer comes as one Delta (cut at a stop string). ``top_p``
    and ``logprobs`` are not offered (the ensemble's generate takes neither).

    Args:
        name: the served name.
        ensemble: the loaded :class:`~fusekit.ensemble.Ensemble`.
        max_queue: most requests waiting.
    """

    kind: Kind = "ensemble"
    gives_logprobs = False

    def __init__(self, name: str, ensemble: Any, *, max_queue: int = 64) -> None:
        self.name = name
        self.ensemble = ensemble
        self.tokenizer = ensemble.primary_member.tokenizer
        self.queue = RequestQueue(max_queue, 1)
        self.worker = SerialWorker(name, self.queue, self._run)

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The primary member's chat template (see :func:`chat_prompt_of`)."""
        return chat_prompt_of(self.tokenizer, self.name, messages)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the primary member's tokenizer, with its start token."""
        start = 1 if self.ensemble.primary_member.vocab.start_id is not None else 0
        return start + len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    async def stream(self, prompt: str, params: SamplingParams, *,
                     threshold: float | None = None) -> AsyncIterator[Delta]:
        """The ensemble's answer to ``prompt`` as one Delta.

        Raises:
            QueueFull: too many requests are waiting.
            FusekitError: ``top_p`` below 1 (ensembles sample from the full distribution), or a
                prompt the ensemble refuses.
        """
        if params.top_p < 1.0:
            raise FusekitError(f"ensemble '{self.name}' samples from the whole distribution; top_p "
                               f"{params.top_p} is not offered, leave it at 1")
        request = Request([], prompt, params, asyncio.get_running_loop())
        async for delta in stream_request(self.queue, request):
            yield delta

    def _run(self, request: Request) -> None:
        """One ensemble generation (worker thread)."""
        params = request.params
        answer = self.ensemble.generate([request.prompt], max_new_tokens=params.max_tokens,
                                        temperature=params.temperature, seed=params.seed).answers[0]
        cut = first_stop(answer.text, params.stop)
        text, stopped = (answer.text, False) if cut is None else (answer.text[:cut], True)
        ids = [int(i) for i in self.tokenizer(text, add_special_tokens=False)["input_ids"]]
        finish = "stop" if stopped or answer.finished else "length"
        request.push(Delta(text, ids, None, finish))

    def queue_depth(self) -> int:
        """Requests accepted and not finished."""
        return self.queue.depth()

    async def close(self) -> None:
        """Finish queued requests and stop the worker thread."""
        self.queue.close()
        await asyncio.to_thread(self.worker.thread.join)


class RouterBackend:
    """A router folder: each prompt is routed (in one worker thread, as ``fusekit route run`` routes
    it) and answered by the chosen model's batched :class:`ModelBackend`.

    Args:
        name: the served name.
        router: the loaded :class:`~fusekit.route.router.Router`.
        backends: one backend per routed model, in the router's model order.
    """

    kind: Kind = "router"
    gives_logprobs = True

    def __init__(self, name: str, router: Any, backends: list[ModelBackend]) -> None:
        self.name = name
        self.router = router
        self.backends = backends
        self._routing = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"fusekit-route-{name}")

    def _template_backend(self) -> ModelBackend:
        for backend in self.backends:
            if getattr(backend.lm.tokenizer, "chat_template", None):
                return backend
        return self.backends[0]

    def chat_prompt(self, messages: list[dict[str, Any]]) -> str:
        """The chat template of the first routed model that has one (see :func:`chat_prompt_of`)."""
        return chat_prompt_of(self._template_backend().lm.tokenizer, self.name, messages)

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the first routed model's tokenizer."""
        return self.backends[0].count_tokens(text)

    def route(self, prompt: str, threshold: float | None = None) -> int:
        """Index of the model the router picks for ``prompt`` (at ``threshold``, else the router's)."""
        return int(self.router.route(prompt, threshold=threshold).index)

    async def stream(self, prompt: str, params: SamplingParams, *,
                     threshold: float | None = None) -> AsyncIterator[Delta]:
        """Route ``prompt`` and stream the chosen model's answer; the first Delta names it.

        Raises:
            QueueFull: the chosen model's queue is full.
            FusekitError: a threshold outside [0, 1], or a prompt the model refuses.
        """
        if threshold is not None and not 0.0 <= threshold <= 1.0:
            raise FusekitError(f"router '{self.name}': threshold {threshold} must be in [0, 1]")
        loop = asyncio.get_running_loop()
        index = await loop.run_in_executor(self._routing, self.route, prompt, threshold)
        first = True
        async for delta in self.backends[index].stream(prompt, params):
            if first:
                delta.model, first = self.router.names[index], False
            yield delta

    def queue_depth(self) -> int:
        """Requests accepted and not finished, over the routed models."""
        return sum(b.queue_depth() for b in self.backends)

    async def close(self) -> None:
        """Stop routing and every model's decode thread."""
        self._routing.shutdown(wait=False)
        for backend in self.backends:
            await backend.close()


def load_backend(name: str, kind: str, ref: str, *, device: str = "cpu", dtype: str | None = "float32",
                 max_batch: int = 16, max_queue: int = 64, batch_wait_ms: float = 5.0) -> Backend:
    """Load one served name.

    Args:
        name: the name clients ask for.
        kind: ``model`` (or ``adapter``), ``ensemble`` or ``router``.
        ref: a model reference, an ensemble recipe file or a router folder.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: the models' dtype (``float32`` default; None: the checkpoint's); an ensemble loads its
            members in its recipe's ``dtype``, as ``fusekit ensemble generate`` does.
        max_batch: most requests one model decodes together.
        max_queue: most requests waiting per model; more get :class:`QueueFull`.
        batch_wait_ms: how long a model's worker waits for batch mates.

    Returns:
        The backend, its worker threads started.

    Raises:
        FusekitError: one line when ``kind`` is unknown, a limit is below 1, or ``ref`` cannot be
            loaded.

    Example:
        >>> load_backend("router", "router", "./router")  # doctest: +SKIP
    """
    if max_batch < 1 or max_queue < 1 or batch_wait_ms < 0:
        raise FusekitError(f"served name '{name}': max_batch ({max_batch}) and max_queue ({max_queue}) "
                           f"must be at least 1 and batch_wait_ms ({batch_wait_ms}) not negative")
    limits: dict[str, Any] = {"max_batch": max_batch, "max_queue": max_queue, "batch_wait_ms": batch_wait_ms}
    if kind in ("model", "adapter"):
        from fusekit.lm import load_lm

        return ModelBackend(name, load_lm(ref, device=device, dtype=dtype), **limits)
    if kind == "ensemble":
        from fusekit.ensemble.engine import load_ensemble

        return EnsembleBackend(name, load_ensemble(Path(ref), device=device), max_queue=max_queue)
    if kind == "router":
        from fusekit.route.router import is_arrow_router

        if is_arrow_router(ref):  # Arrow routes per token inside one model: served like a model
            from fusekit.route.arrow import load_arrow, load_arrow_lm

            return ModelBackend(name, load_arrow_lm(load_arrow(ref), device=device, dtype=dtype), **limits)
        return _load_router(name, ref, device=device, dtype=dtype, limits=limits)
    raise FusekitError(f"served name '{name}': kind '{kind}' is not one of model, adapter, ensemble, router")


def _load_router(name: str, ref: str, *, device: str, dtype: str | None,
                 limits: dict[str, Any]) -> RouterBackend:
    """A router folder and one batched backend per routed model (a model named twice loads once)."""
    from fusekit.lm import load_lm
    from fusekit.route.router import load_router

    router = load_router(ref, device=device)
    loaded: dict[str, ModelBackend] = {}
    backends = []
    for model in router.models:
        where = model.reference()
        if where not in loaded:
            loaded[where] = ModelBackend(f"{name}/{model.name}", load_lm(where, device=device, dtype=dtype),
                                         **limits)
        backends.append(loaded[where])
    return RouterBackend(name, router, backends)
