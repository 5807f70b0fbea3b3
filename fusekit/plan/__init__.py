"""Plans: what every output tensor is made of, and the executor that makes it."""

from fusekit.plan.build import build_plan
from fusekit.plan.executor import ExecutionStats, Executor
from fusekit.plan.graph import Plan, TensorInput, TensorTask

__all__ = ["ExecutionStats", "Executor", "Plan", "TensorInput", "TensorTask", "build_plan"]
