"""Sparse upcycling: dense models → a Mixtral or Qwen2-MoE checkpoint with initialised gates.

``plan_moe`` (:mod:`fusekit.moe.plan`) reads recipes, configs and headers only; ``run_moe``
(:mod:`fusekit.moe.build`) computes the gates (a forward pass of the base for ``hidden``) and
streams the checkpoint. transformers is imported only for the ``hidden`` and ``cheap_embed`` gates
(model, tokenizer) and to check the written config.
"""

from fusekit.moe.build import MoeResult, run_moe
from fusekit.moe.plan import MoePlan, plan_moe
from fusekit.moe.recipe import ARCHITECTURES, Expert, MoeRecipe, is_moe_recipe, load_moe_recipe

__all__ = ["ARCHITECTURES", "Expert", "MoePlan", "MoeRecipe", "MoeResult", "is_moe_recipe",
           "load_moe_recipe", "plan_moe", "run_moe"]
