"""``fusekit tune``: search a recipe's coefficients against your own text and write back a plain
recipe that ``fusekit merge`` (or ``fusekit ensemble``) reproduces.

Public names (the heavy ones load on first use, so that recipe validation imports no torch):

- :func:`load_tune_spec`, :class:`TuneSpec`, :class:`SearchSpace`: a recipe with search spaces and
  a ``tune:`` block (:mod:`fusekit.tune.spec`, :mod:`fusekit.tune.space`).
- :func:`make_optimizer`: CMA-ES, random or grid search as ask/tell (:mod:`fusekit.tune.optimizers`);
  the gradient search is :class:`fusekit.tune.gradient.GradientSearch`.
- :class:`Evaluator`: one candidate merged in memory and scored (:mod:`fusekit.tune.evaluate`).
- :func:`make_runner`: in-process or Ray (:mod:`fusekit.tune.runner`).
- :func:`tune`, :class:`TuneResult`: the whole search with checkpoints, resume and the report
  (:mod:`fusekit.tune.search`, :mod:`fusekit.tune.report`).
"""

from __future__ import annotations

import importlib

__all__ = ["Evaluator", "SearchSpace", "TuneResult", "TuneSpec", "load_tune_spec", "make_optimizer",
           "make_runner", "tune"]

_HOMES = {"Evaluator": "evaluate", "SearchSpace": "space", "TuneResult": "search", "TuneSpec": "spec",
          "load_tune_spec": "spec", "make_optimizer": "optimizers", "make_runner": "runner",
          "tune": "search"}


def __getattr__(name: str) -> object:
    if name in _HOMES:
        return getattr(importlib.import_module(f"fusekit.tune.{_HOMES[name]}"), name)
    raise AttributeError(name)
