"""Plans: what every output tensor is made of, and the executor that makes it.

- :mod:`fusekit.plan.graph`: :class:`TensorTask` (one output tensor), :class:`TaskGraph` (tasks and
  the models they read: what the executor runs) and :class:`Plan` (a merge: recipe, tasks, config).
- :mod:`fusekit.plan.build`: :func:`build_plan`, recipe → :class:`Plan`, from headers alone.
- :mod:`fusekit.plan.memory`: work units, the memory budget and ``fusekit plan``'s estimate.
- :mod:`fusekit.plan.executor`, :mod:`fusekit.plan.pipeline`: run the units (reader, kernel and
  writer threads); :mod:`fusekit.plan.process`: the process settings a run scopes.

The names below are imported on first use (PEP 562), so importing a light submodule such as
:mod:`fusekit.plan.process` does not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fusekit.plan.build import build_plan
    from fusekit.plan.executor import ExecutionStats, Executor
    from fusekit.plan.graph import Plan, TaskGraph, TensorInput, TensorTask

__all__ = ["ExecutionStats", "Executor", "Plan", "TaskGraph", "TensorInput", "TensorTask", "build_plan"]
_HOME = {"build_plan": "build", "ExecutionStats": "executor", "Executor": "executor", "Plan": "graph",
         "TaskGraph": "graph", "TensorInput": "graph", "TensorTask": "graph"}


def __getattr__(name: str) -> Any:
    if name in _HOME:
        return getattr(importlib.import_module(f"fusekit.plan.{_HOME[name]}"), name)
    raise AttributeError(f"module 'fusekit.plan' has no attribute '{name}'")
