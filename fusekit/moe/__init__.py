"""Sparse upcycling: dense models → a Mixtral, Qwen2-MoE, Qwen3-MoE or DeepSeek-MoE checkpoint.

``plan_moe`` (:mod:`fusekit.moe.plan`) reads recipes, configs and headers only; ``run_moe``
(:mod:`fusekit.moe.build`) computes the gates (a forward pass of the base for ``hidden``) and
streams the checkpoint. transformers is imported only for the ``hidden`` and ``cheap_embed`` gates
(model, tokenizer) and to check the written config.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from fusekit.moe.recipe import ARCHITECTURES, Expert, MoeRecipe, is_moe_recipe, load_moe_recipe

if TYPE_CHECKING:
    from fusekit.moe.build import MoeResult, run_moe
    from fusekit.moe.plan import MoePlan, plan_moe

__all__ = ["ARCHITECTURES", "Expert", "MoePlan", "MoeRecipe", "MoeResult", "is_moe_recipe",
           "load_moe_recipe", "plan_moe", "run_moe"]

_LAZY = {"MoeResult": "fusekit.moe.build", "run_moe": "fusekit.moe.build", "MoePlan": "fusekit.moe.plan",
         "plan_moe": "fusekit.moe.plan"}


def __getattr__(name: str) -> Any:  # planning and building load torch: only on first use
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fusekit.moe' has no attribute '{name}'")
