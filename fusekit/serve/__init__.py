"""``fusekit serve``: an OpenAI-compatible HTTP server for models, merged outputs, ensembles and routers.

The FastAPI app (:mod:`fusekit.serve.app`) answers ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` (streamed or not), ``/health`` and ``/metrics``; backends
(:mod:`fusekit.serve.backends`) batch requests into each model's decoder. Nothing else in fusekit
imports this package; FastAPI and uvicorn (the ``serve`` extra) are imported only here, and only when
a name below is first used.

Example:
    >>> from fusekit.serve import load_serve_config, serve  # doctest: +SKIP
    >>> serve(load_serve_config("configs/serve/demo.yaml"))  # doctest: +SKIP
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fusekit.serve.config import Limits, ServeConfig, ServedModel, load_serve_config, quick_config

if TYPE_CHECKING:
    from fusekit.serve.app import create_app
    from fusekit.serve.backends import Backend, load_backend
    from fusekit.serve.server import serve

__all__ = ["Backend", "Limits", "ServeConfig", "ServedModel", "create_app", "load_backend",
           "load_serve_config", "quick_config", "serve"]

_LAZY = {"create_app": "app", "Backend": "backends", "load_backend": "backends", "serve": "server"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f"fusekit.serve.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fusekit.serve' has no attribute '{name}'")
