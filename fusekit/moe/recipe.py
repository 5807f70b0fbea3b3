"""MoE recipes in mergekit-moe's YAML format: schema, loading with line marks, and checks.

A recipe names a ``base_model`` (attention, norms, embeddings and LM head donor) and ``experts``
whose MLPs become the experts of every layer; ``gate_mode`` says how the routers start out. Loading
reuses :mod:`fusekit.recipe.load`, so every problem is reported as ``file:line:col key: message``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from fusekit.errors import RecipeError
from fusekit.recipe.load import Location, RecipeSource, parse_yaml, read_recipe_text, validate
from fusekit.recipe.schema import DType, ModelRefText

GateMode = Literal["hidden", "cheap_embed", "random", "uniform_random"]
PROMPT_GATES = ("hidden", "cheap_embed")
# Output architectures fusekit writes, and the names mergekit-moe recipes use for them. mergekit-moe
# matches `architecture:` as a prefix of "Mixtral", "DeepSeek MoE", "Qwen MoE" and "Qwen3 MoE", so
# `qwen` names both Qwen outputs; the plan picks Qwen2-MoE with a shared expert, Qwen3-MoE without.
ARCHITECTURES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek")
QWEN_FAMILY = "qwen"
_ARCHITECTURE_ALIASES = {
    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen_moe": "qwen2_moe", "qwen2moe": "qwen2_moe",
    "qwen2": "qwen2_moe", "qwen": QWEN_FAMILY, "qwen3": "qwen3_moe", "qwen3_moe": "qwen3_moe",
    "qwen3moe": "qwen3_moe", "deepseek": "deepseek", "deepseek_moe": "deepseek", "deepseekmoe": "deepseek",
}
# How many shared experts each output holds: Qwen2-MoE exactly one, DeepSeek-MoE none or one.
SHARED_EXPERTS = {"mixtral": (0,), "qwen2_moe": (1,), "qwen3_moe": (0,), "deepseek": (0, 1)}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Expert(_Strict):
    """One entry of ``experts`` (or ``shared_experts``).

    Attributes:
        source_model: the dense model whose MLP becomes this expert.
        positive_prompts / negative_prompts: text the expert should (not) be routed; ``hidden``
            and ``cheap_embed`` gates are computed from them. An empty prompt ``""`` is the start
            of a text alone (the base tokenizer's BOS token), as mergekit-moe reads it.
        noise_scale: standard deviation of the Gaussian noise added to the copied weights
            (None: exact copies).
        residual_scale: factor on the expert's ``down_proj`` (for a shared expert: its share of
            the MLP output, in [0, 1]).
    """

    source_model: ModelRefText
    positive_prompts: list[str] | None = None
    negative_prompts: list[str] | None = None
    noise_scale: float | None = Field(None, ge=0, allow_inf_nan=False)
    residual_scale: float | None = Field(None, allow_inf_nan=False)

    def prompt_sets(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The positive and negative prompts as tuples (empty when not given), for comparing experts."""
        return tuple(self.positive_prompts or ()), tuple(self.negative_prompts or ())


class MoeRecipe(_Strict):
    """A whole ``fusekit moe`` recipe (mergekit-moe's format).

    Attributes:
        base_model: donor of attention, norms, embeddings and LM head.
        experts: one entry per routed expert.
        gate_mode: how routers start out: ``hidden`` (default), ``cheap_embed``, ``random`` or
            ``uniform_random``.
        experts_per_token: experts each token is routed to (default 2).
        shared_experts: at most one always-on expert (Qwen2-MoE, DeepSeek-MoE).
        architecture: ``mixtral``, ``qwen2_moe``, ``qwen3_moe`` or ``deepseek`` (mergekit-moe's
            names accepted; ``qwen`` is Qwen2-MoE with a shared expert, Qwen3-MoE without); None
            chooses from ``shared_experts`` and the base's model_type.
        dtype: output dtype (default: the base's).

    Example:
        >>> MoeRecipe(base_model="./base", experts=[Expert(source_model="./math")]).gate_mode
        'hidden'
    """

    base_model: ModelRefText
    experts: list[Expert] = Field(min_length=1)
    gate_mode: GateMode = "hidden"
    experts_per_token: int = 2
    shared_experts: list[Expert] | None = None
    architecture: str | None = None
    dtype: DType | None = None

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str | None) -> str | None:
        if value is None:
            return None
        name = _ARCHITECTURE_ALIASES.get(value.strip().lower().replace("-", "_").replace(" ", "_"))
        if name is None:
            raise ValueError(f"unknown architecture '{value}'; valid: {', '.join(ARCHITECTURES)} "
                             "(or leave it out to choose automatically)")
        return name

    def expert_refs(self) -> list[str]:
        """Every model the recipe reads, base first, without duplicates.

        Returns:
            Model references in recipe order.
        """
        refs = [self.base_model, *(e.source_model for e in self.experts),
                *(e.source_model for e in self.shared_experts or [])]
        return list(dict.fromkeys(refs))


def check_moe_recipe(recipe: MoeRecipe, *, allow_identical_experts: bool = False
                     ) -> list[tuple[Location, str]]:
    """Problems that need more than one key to see, as (location, message) pairs."""
    problems: list[tuple[Location, str]] = []
    count = len(recipe.experts)
    if not 1 <= recipe.experts_per_token <= count:
        problems.append((("experts_per_token",), f"must be between 1 and the number of experts "
                         f"({count}), got {recipe.experts_per_token}"))
    if recipe.gate_mode in PROMPT_GATES:
        for i, expert in enumerate(recipe.experts):
            if not expert.positive_prompts:
                problems.append((("experts", i), f"gate_mode {recipe.gate_mode} needs "
                                 "positive_prompts for every expert; add some, or use gate_mode "
                                 "random"))
        sets = {e.prompt_sets() for e in recipe.experts}
        if count > 1 and len(sets) == 1 and all(e.positive_prompts for e in recipe.experts):
            problems.append((("experts",), "every expert has the same prompts, so the gates "
                             "cannot tell them apart; give each expert prompts for what it is "
                             "good at"))
    shared = recipe.shared_experts or []
    if len(shared) > 1:
        problems.append((("shared_experts",), f"at most one shared expert is supported, got "
                         f"{len(shared)}"))
    arch = recipe.architecture
    if shared and arch in SHARED_EXPERTS and 1 not in SHARED_EXPERTS[arch]:
        with_shared = " or ".join(a for a, counts in SHARED_EXPERTS.items() if 1 in counts)
        problems.append((("shared_experts",), f"architecture {arch} has no shared "
                         f"expert; remove shared_experts or use architecture: {with_shared}"))
    if arch == "qwen2_moe" and not shared:
        problems.append((("architecture",), "qwen2_moe needs one entry in shared_experts (its "
                         "always-on expert; mergekit-moe refuses this too); add one, or use "
                         "architecture: mixtral, deepseek, or qwen3_moe for Qwen3 models"))
    for i, expert in enumerate(shared):
        scale = expert.residual_scale
        if scale is not None and not 0 <= scale <= 1:
            problems.append((("shared_experts", i, "residual_scale"), "the shared expert's "
                             f"share of the MLP output must be in [0, 1], got {scale}"))
    sources = {e.source_model for e in recipe.experts}
    if count > 1 and len(sources) == 1 and not allow_identical_experts:
        problems.append((("experts",), f"every expert is the same model '{recipe.experts[0].source_model}'"
                         "; the MoE would compute exactly what that model does at a higher cost. "
                         "Pass --allow-identical-experts (mergekit-moe's "
                         "--i-understand-this-is-not-useful-without-training) if you will train it"))
    return problems


def parse_moe_recipe(text: str, name: str = "<recipe>", *, allow_identical_experts: bool = False
                     ) -> tuple[MoeRecipe, RecipeSource]:
    """Parse and validate MoE recipe text; raise RecipeError naming file, line and key."""
    data, source = parse_yaml(text, name)
    recipe = validate(MoeRecipe, data, source, lambda r: check_moe_recipe(
        r, allow_identical_experts=allow_identical_experts))
    return recipe, source


def load_moe_recipe(path: Path | str, *, allow_identical_experts: bool = False
                    ) -> tuple[MoeRecipe, RecipeSource, str]:
    """Read, parse and validate an MoE recipe file.

    Args:
        path: the YAML file.
        allow_identical_experts: accept a recipe whose experts are all the same model.

    Returns:
        The recipe, its line marks, and its text as written.

    Raises:
        RecipeError: every problem found, each as ``file:line:col key: message``.

    Example:
        >>> recipe, _, text = load_moe_recipe("configs/moe/mixtral-hidden.yaml")  # doctest: +SKIP
    """
    path = Path(path)
    text = read_recipe_text(path)
    recipe, source = parse_moe_recipe(text, str(path), allow_identical_experts=allow_identical_experts)
    return recipe, source, text


def is_moe_recipe(path: Path | str) -> bool:
    """Whether ``path`` holds an MoE recipe (a mapping with ``experts`` and no ``merge_method``).

    Unreadable or malformed files answer False, so the merge loader reports their problem.

    Args:
        path: the recipe file.

    Returns:
        True for an MoE recipe.
    """
    try:
        data: Any
        data, _ = parse_yaml(read_recipe_text(Path(path)), str(path))
    except RecipeError:
        return False
    return isinstance(data, dict) and "experts" in data and "merge_method" not in data
