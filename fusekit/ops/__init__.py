"""Merge operators. Every operator module is imported here explicitly so it registers itself."""

from fusekit.ops import linear, passthrough, task_vectors
from fusekit.ops.registry import (
           MergeInputs,
           MergeMethod,
           Params,
           get_method,
           method_names,
           register,
)

__all__ = ["MergeInputs", "MergeMethod", "Params", "get_method", "method_names", "register",
           "linear", "passthrough", "task_vectors"]
