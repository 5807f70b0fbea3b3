"""Routing: learn from local data which model should answer each query, trade cost against quality,
and send each query to its model.

``fusekit route build`` → :func:`build_router`; ``fusekit route eval`` → :func:`evaluate_router`;
``fusekit route run`` → :func:`run_router`. Needs the ``lm`` extra for ``loss``/``pairwise`` labels
and ``hidden``/``embedding`` features; ``tfidf`` features with ``given`` labels need only torch.
"""

from fusekit.route.build import BuildResult, build_router
from fusekit.route.data import Example, RouteDataError, load_examples
from fusekit.route.evaluate import EvalReport, evaluate_router
from fusekit.route.recipe import RouteRecipe, load_route_recipe, parse_route_recipe
from fusekit.route.router import Decision, Router, RouterFolderError, load_router
from fusekit.route.run import RunResult, run_router

__all__ = ["BuildResult", "Decision", "EvalReport", "Example", "RouteDataError", "RouteRecipe", "Router",
           "RouterFolderError", "RunResult", "build_router", "evaluate_router", "load_examples",
           "load_route_recipe", "load_router", "parse_route_recipe", "run_router"]
