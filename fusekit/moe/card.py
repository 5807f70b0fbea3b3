"""The model card (README.md) of an upcycled MoE: experts, their prompts, gates, base, recipe."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from fusekit.io.card import card_metadata, front_matter, input_line, rebuild_lines
from fusekit.version import __version__

if TYPE_CHECKING:
    from fusekit.moe.plan import MoePlan
    from fusekit.moe.recipe import Expert

_GATE_TEXT = {
    "hidden": "each router row is the base model's normalised last-token hidden state at that layer, "
              "averaged over the expert's positive prompts minus the average over its negative ones",
    "cheap_embed": "each router row is the normalised mean token embedding of the expert's positive "
                   "prompts minus that of its negative ones (the same for every layer)",
    "random": "router rows are drawn from a standard normal distribution",
    "uniform_random": "router rows are drawn uniformly from ±1/sqrt(hidden size)",
}


def _prompts(label: str, prompts: list[str] | None) -> list[str]:
    if not prompts:
        return []
    return [f"  - {label}:", *[f"    - {json.dumps(p, ensure_ascii=False)}" for p in prompts]]


def _expert_lines(title: str, expert: Expert) -> list[str]:
    extra = [f"{key} {value}" for key, value in (("noise_scale", expert.noise_scale),
                                                   ("residual_scale", expert.residual_scale))
             if value is not None]
    head = f"- {title}: `{expert.source_model}`" + (f" ({', '.join(extra)})" if extra else "")
    return [head, *_prompts("positive prompts", expert.positive_prompts),
            *_prompts("negative prompts", expert.negative_prompts)]


def moe_card(moe_plan: MoePlan, *, name: str, seed: int) -> str:
    """README.md text: Hub front matter (as :func:`fusekit.io.card.card_metadata` writes it, tagged
    ``moe`` too), inputs, experts, gates, recipe; ``seed`` is shown only when the build is stochastic."""
    from fusekit.moe.build import RECIPE_COPY  # build imports this module

    recipe = moe_plan.recipe
    shown_seed = seed if moe_plan.stochastic else None
    metadata = card_metadata(refs=recipe.expert_refs(), method="moe", tags=["moe"], seed=shown_seed,
                             recipe_file=RECIPE_COPY)
    shared = recipe.shared_experts or []
    lines = [
        *front_matter(metadata), "", f"# {name}", "",
        f"A {moe_plan.architecture} mixture of experts upcycled from dense models with fusekit "
        f"{__version__}: {len(recipe.experts)} experts per layer, {recipe.experts_per_token} active "
        f"per token{', plus one always-on shared expert' if shared else ''}. Attention, norms, "
        f"embeddings and the LM head come from the base model `{recipe.base_model}`; each expert "
        "is the MLP of its source model.", "",
        *(["DeepSeek-MoE's modelling code lives on the Hub: load this model with "
           "`trust_remote_code=True` (see `auto_map` in config.json).", ""]
          if moe_plan.architecture == "deepseek" else []),
        f"Gate mode: `{recipe.gate_mode}` — {_GATE_TEXT[recipe.gate_mode]}.", "",
        "## Models", "",
        *[input_line(ref, ref, base=ref == recipe.base_model) for ref in recipe.expert_refs()], "",
        "## Experts", "",
    ]
    for index, expert in enumerate(recipe.experts):
        lines += _expert_lines(f"expert {index}", expert)
    for expert in shared:
        lines += _expert_lines("shared expert", expert)
    lines += ["", *rebuild_lines("fusekit moe", RECIPE_COPY, moe_plan.recipe_text, shown_seed,
                                      locked=False)]
    return "\n".join(lines)
