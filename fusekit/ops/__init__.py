"""Merge operators. Every operator module is imported here explicitly so it registers itself."""

from fusekit.ops import (
    arcee_fusion,
    linear,
    model_stock,
    moe,
    nearswap,
    passthrough,
    ram,
    spherical,
    task_vectors,
)
from fusekit.ops.registry import (
    MergeInputs,
    MergeMethod,
    Params,
    get_method,
    method_names,
    register,
    seeded_generator,
)

__all__ = ["MergeInputs", "MergeMethod", "Params", "arcee_fusion", "get_method", "linear",
           "method_names", "model_stock", "moe", "nearswap", "passthrough", "ram", "register",
           "seeded_generator", "spherical", "task_vectors"]
