"""Routing: learn from local data which model should answer each query, trade cost against quality,
and send each query to its model.

``fusekit route build`` → :func:`build_router`; ``fusekit route eval`` → :func:`evaluate_router`;
``fusekit route run`` → :func:`run_router`. ``router: arrow`` (:mod:`fusekit.route.arrow`) routes
each token among LoRA adapters of one base with PEFT's Arrow, with no data. Needs the ``lm`` extra
for ``loss``/``pairwise`` labels and ``hidden``/``embedding`` features (and ``lora`` for Arrow);
``tfidf`` features with ``given`` labels need only torch.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fusekit.route.recipe import RouteRecipe, load_route_recipe, parse_route_recipe

if TYPE_CHECKING:
    from fusekit.route.arrow import Arrow, load_arrow, load_arrow_lm
    from fusekit.route.build import BuildResult, build_router
    from fusekit.route.data import Example, RouteDataError, load_examples
    from fusekit.route.evaluate import EvalReport, evaluate_router
    from fusekit.route.router import Decision, Router, RouterFolderError, load_router
    from fusekit.route.run import RunResult, run_router

__all__ = ["Arrow", "BuildResult", "Decision", "EvalReport", "Example", "RouteDataError", "RouteRecipe",
           "Router", "RouterFolderError", "RunResult", "build_router", "evaluate_router", "load_arrow",
           "load_arrow_lm", "load_examples", "load_route_recipe", "load_router", "parse_route_recipe",
           "run_router"]

_LAZY = {"Arrow": "arrow", "load_arrow": "arrow", "load_arrow_lm": "arrow",
         "BuildResult": "build", "build_router": "build", "Example": "data", "RouteDataError": "data",
         "load_examples": "data", "EvalReport": "evaluate", "evaluate_router": "evaluate",
         "Decision": "router", "Router": "router", "RouterFolderError": "router", "load_router": "router",
         "RunResult": "run", "run_router": "run"}


def __getattr__(name: str) -> Any:  # routers, features and data load torch: only on first use
    if name in _LAZY:
        return getattr(import_module(f"fusekit.route.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'fusekit.route' has no attribute '{name}'")
