"""Run the server: load every served model, bind the port, serve until SIGTERM, drain, exit cleanly.

:func:`serve` loads each backend first (a model that cannot load is one
:class:`~fusekit.errors.FusekitError` line before any port is bound), then binds the socket itself
(a port in use is one line too), then runs uvicorn. On SIGTERM (or Ctrl-C) the server drains: the
listening socket closes, requests that arrive on open connections get 503, and requests in flight
run to their end for up to ``limits.grace_seconds``; then the backends are closed and :func:`serve`
returns normally, so ``fusekit serve`` exits 0. A second Ctrl-C stops at once.

Example:
    >>> serve(load_serve_config("configs/serve/demo.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from types import FrameType
from typing import TYPE_CHECKING, Any

from fusekit.errors import FusekitError
from fusekit.serve.config import ServeConfig

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

    from fusekit.serve.backends import Backend

__all__ = ["bind", "build_app", "load_backends", "make_server", "serve"]


def load_backends(config: ServeConfig, *, device: str | None = None) -> dict[str, Backend]:
    """Load every served model of ``config``, in order.

    Args:
        config: the serve config.
        device: overrides the config's ``device``.

    Returns:
        The backends by served name.

    Raises:
        FusekitError: one line naming the served name that could not load (those loaded before it
            are closed again).
    """
    from fusekit.serve.backends import load_backend

    loaded: dict[str, Backend] = {}
    limits = config.limits
    try:
        for served in config.models:
            wait = limits.batch_wait_ms if served.batch_wait_ms is None else served.batch_wait_ms
            try:
                loaded[served.name] = load_backend(
                    served.name, served.kind, served.ref, device=device or config.device, dtype=served.dtype,
                    max_batch=served.max_batch or limits.max_batch,
                    max_queue=served.max_queue or limits.max_queue, batch_wait_ms=wait)
            except FusekitError as exc:
                raise FusekitError(f"cannot serve {served.name!r} ({served.kind} {served.ref}): "
                                   f"{exc}") from None
    except BaseException:
        asyncio.run(close_backends(loaded))
        raise
    return loaded


async def close_backends(backends: Mapping[str, Backend]) -> None:
    """Close every backend (their worker threads finish what they hold and stop)."""
    for backend in backends.values():
        await backend.close()


def build_app(config: ServeConfig, backends: Mapping[str, Backend], *, api_key: str | None = None) -> FastAPI:
    """The app over ``backends``, closing them when the server shuts down."""
    from fusekit.serve.app import create_app

    app = create_app(backends, limits=config.limits, api_key=api_key)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        yield
        await close_backends(backends)

    app.router.lifespan_context = lifespan
    return app


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port).

    Raises:
        FusekitError: the address cannot be bound (in use, not this machine's, no permission).
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise FusekitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port "
                           "or --host") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


def make_server(app: FastAPI, *, grace_seconds: float, on_started: Callable[[], None] | None = None
                ) -> uvicorn.Server:
    """A uvicorn server for ``app`` that drains on SIGTERM/SIGINT and then returns normally.

    Args:
        app: the app (its ``state.fusekit`` is marked draining on the first signal).
        grace_seconds: how long requests in flight may run once a stop is asked for.
        on_started: called once the server listens.
    """
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            app.state.fusekit.draining = True
            if self.should_exit and sig == signal.SIGINT:
                self.force_exit = True
            self.should_exit = True  # the signal is not kept to be raised again: a drain is a clean exit

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started and on_started is not None:
                on_started()

    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on",
                            timeout_graceful_shutdown=int(grace_seconds + 0.999), timeout_keep_alive=5)
    return DrainingServer(config)


def serve(config: ServeConfig, *, api_key: str | None = None, device: str | None = None,
          announce: Callable[[str], None] | None = None) -> None:
    """Load, bind and serve until stopped; see the module docstring.

    Args:
        config: what to serve and how.
        api_key: the key clients must send as ``Authorization: Bearer KEY`` (None: no key).
        device: overrides the config's ``device``.
        announce: called with one line once the server listens (default: written to stderr).

    Raises:
        FusekitError: a model that cannot load, or an address that cannot be bound.
    """
    backends = load_backends(config, device=device)
    try:
        sock = bind(config.host, config.port)
    except FusekitError:
        asyncio.run(close_backends(backends))
        raise
    port = sock.getsockname()[1]
    names = ", ".join(f"{name} ({backend.kind})" for name, backend in backends.items())
    where = f"[{config.host}]" if ":" in config.host else config.host
    line = f"fusekit: serving {names} on http://{where}:{port}/v1 (Ctrl-C or SIGTERM stops)"
    app = build_app(config, backends, api_key=api_key)
    server = make_server(app, grace_seconds=config.limits.grace_seconds,
                         on_started=lambda: (announce or _to_stderr)(line))
    server.run(sockets=[sock])


def _to_stderr(line: str) -> None:
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
