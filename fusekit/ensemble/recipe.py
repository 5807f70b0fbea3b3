"""Ensemble recipes: which models to combine, how, and with which generation defaults.

Loaded with the merge recipes' YAML reader, so every problem is reported as one line
``ens.yaml:7:5 parameters.top_k: ...`` and unknown keys come with a suggestion.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from fusekit.recipe.load import Location, RecipeSource, load_recipe, parse_recipe, suggest
from fusekit.recipe.numbers import Seed
from fusekit.recipe.schema import DType, ModelRefText, _fold_revision

SAME_VOCAB_METHODS = ("prob_avg", "logit_avg", "cascade")
"""Token-level methods that add up distributions over one shared vocabulary."""
CROSS_VOCAB_METHODS = ("union", "topk_union", "relative")
"""Token-level methods that align different vocabularies."""
ANSWER_METHODS = ("vote", "mbr")
"""Methods that choose among whole answers written by the members."""
BYTE_METHODS = ("byte",)
"""Methods that mix the members' next-byte distributions (any tokenizers)."""
METHODS = (*SAME_VOCAB_METHODS, *CROSS_VOCAB_METHODS, *ANSWER_METHODS, *BYTE_METHODS)

Method = Literal["prob_avg", "logit_avg", "cascade", "union", "topk_union", "relative", "vote", "mbr", "byte"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberParameters(_Strict):
    """A merge recipe entry's ``parameters:`` in an ensemble: the member's ``weight``, nothing else."""

    weight: float = Field(gt=0, allow_inf_nan=False)


class EnsembleMember(_Strict):
    """One entry of ``models:``: a model reference and its weight (> 0, default 1).

    A merge recipe's entries work unchanged: ``{model: a, parameters: {weight: 0.3}}`` weighs the
    member 0.3, and ``revision:`` beside ``model`` reads as ``model@revision``.
    """

    model: ModelRefText
    weight: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    parameters: MemberParameters | None = None
    revision: str | None = None

    _revision = model_validator(mode="before")(_fold_revision)

    @model_validator(mode="after")
    def _one_weight(self) -> EnsembleMember:
        if self.parameters is not None and "weight" in self.model_fields_set:
            raise ValueError("the weight is given twice (weight and parameters.weight); keep one")
        return self

    @property
    def share(self) -> float:
        """The member's weight before normalisation: ``parameters.weight`` or ``weight``."""
        return self.parameters.weight if self.parameters is not None else self.weight


class GenerationConfig(_Strict):
    """Defaults for ``fusekit ensemble generate``; command-line options override them."""

    max_new_tokens: int = Field(default=64, ge=1, le=100_000)
    temperature: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    seed: Seed = 0
    stop_at_eos: bool = True


# --- per-method parameters -----------------------------------------------------------------------

class _GateParams(_Strict):
    gate: float | None = Field(default=None, gt=0, le=1)
    """Ensemble only where the primary's top probability is below this; None: always."""


class ProbAvgParams(_GateParams):
    pass


class LogitAvgParams(_GateParams):
    pass


class UnionParams(_GateParams):
    pass


class TopkUnionParams(_GateParams):
    top_k: int = Field(default=10, ge=1)


class RelativeParams(_GateParams):
    neighbours: int = Field(default=4, ge=1, le=256)
    """Primary tokens a token the primary lacks maps back to (nearest in relative space)."""
    temperature: float = Field(default=0.05, gt=0, allow_inf_nan=False)
    """Softmax temperature over those neighbours' similarities (lower: nearest takes all)."""
    embeddings: Literal["output", "input"] = "output"
    """Which embedding matrix the relative representations are computed from."""
    steps: int = Field(default=0, ge=0, le=1000)
    """Refinement steps towards the aggregate in relative space after the map back (0: none)."""
    learning_rate: float = Field(default=0.15, gt=0, allow_inf_nan=False)
    candidates: int = Field(default=64, ge=1)
    """Tokens the refinement steps move (the most likely ones after the map back)."""
    max_anchors: int | None = Field(default=None, ge=1)
    max_table_memory: str = "1GB"
    sparsify: bool = False
    sparse_k: int = Field(default=32, ge=1)
    cache_dir: str | None = None

    @field_validator("max_table_memory")
    @classmethod
    def _size(cls, value: str) -> str:
        from fusekit.errors import FusekitError
        from fusekit.sizes import parse_size

        try:
            parse_size(value, "max_table_memory")
        except FusekitError as exc:
            raise ValueError(str(exc).removeprefix("max_table_memory: ")) from None
        return value


class ByteParams(_GateParams):
    beam: int = Field(default=2, ge=1, le=64)
    """Tokenizations each member keeps per byte offset where they end (more: closer to exact, slower)."""


class CascadeParams(_Strict):
    threshold: float = Field(default=0.5, gt=0, le=1)


class VoteParams(_Strict):
    samples: int = Field(default=1, ge=1, le=64)


class MbrParams(_Strict):
    samples: int = Field(default=1, ge=1, le=64)
    utility: Literal["chrf", "token_f1"] = "chrf"


PARAMS: dict[str, type[_Strict]] = {
    "prob_avg": ProbAvgParams, "logit_avg": LogitAvgParams, "union": UnionParams,
    "topk_union": TopkUnionParams, "relative": RelativeParams, "cascade": CascadeParams,
    "vote": VoteParams, "mbr": MbrParams, "byte": ByteParams,
}


class EnsembleRecipe(_Strict):
    """A whole ensemble recipe (``fusekit ensemble``).

    Attributes:
        models: the members, each a model reference and a weight (> 0).
        method: how they are combined (see :mod:`fusekit.ensemble.methods`).
        primary: index of the member whose tokenizer reads prompts and text.
        parameters: the method's parameters (checked against its typed model when the recipe loads).
        generation: defaults for ``generate``.
        dtype: the dtype members are loaded in.
        shared_base: how LoRA adapter members over one base are loaded: None (auto) holds a base
            that two or more members use once, its adapters beside it; true does so for every
            adapter and refuses adapters over different bases; false loads each member on its own.

    Example:
        >>> recipe, _ = parse_ensemble_recipe("models:\\n  - model: a\\n  - model: b\\nmethod: logit_avg\\n")
        >>> recipe.weights()
        [0.5, 0.5]
    """

    models: list[EnsembleMember] = Field(min_length=1)
    method: Method = "prob_avg"
    primary: int = 0
    parameters: dict[str, Any] = Field(default_factory=dict)
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    dtype: DType = "float32"
    shared_base: bool | None = None

    def params(self) -> Any:
        """The method's parameters as its typed model (validated when the recipe loaded).

        Returns:
            An instance of the method's parameter model, e.g. :class:`TopkUnionParams`.
        """
        return PARAMS[self.method].model_validate(self.parameters)

    def weights(self) -> list[float]:
        """Member weights normalised to sum to 1.

        Returns:
            One weight per member, in recipe order.
        """
        total = sum(m.share for m in self.models)
        return [m.share / total for m in self.models]

    def refs(self) -> list[str]:
        """The members' model references, in recipe order.

        Returns:
            Each ``models[i].model`` as written.
        """
        return [m.model for m in self.models]


def check_ensemble_recipe(recipe: EnsembleRecipe) -> list[tuple[Location, str]]:
    """Problems pydantic cannot see alone: primary range and the method's parameters."""
    problems: list[tuple[Location, str]] = []
    n = len(recipe.models)
    if not 0 <= recipe.primary < n:
        problems.append((("primary",), f"primary must index models (0 to {n - 1}), got {recipe.primary}"))
    params_model = PARAMS[recipe.method]
    try:
        params_model.model_validate(recipe.parameters)
    except ValidationError as exc:
        for err in exc.errors():
            loc: Location = ("parameters", *err["loc"])
            if err["type"] == "extra_forbidden":
                key = str(err["loc"][-1])
                takes = ", ".join(params_model.model_fields) or "none"
                hint = suggest(key, params_model.model_fields)
                hint = hint if "did you mean" in hint else ""
                message = (f"'{key}' is not a parameter of {recipe.method}{hint} "
                           f"({recipe.method} takes: {takes})")
            else:
                message = str(err["msg"]).removeprefix("Value error, ")
                if err["type"] not in ("value_error", "assertion_error") and "input" in err:
                    message = f"{message}, got {err['input']!r}"
            problems.append((loc, message))
    samples = recipe.parameters.get("samples")
    if isinstance(samples, int) and samples > 1 and recipe.generation.temperature == 0:
        problems.append((("parameters", "samples"), f"{samples} samples at generation.temperature 0 are "
                         "all the same greedy answer; set generation.temperature above 0 (e.g. 0.7)"))
    if recipe.method == "cascade" and n < 2:
        problems.append((("models",), "cascade needs at least two models, ordered cheap to expensive"))
    return problems


def load_ensemble_recipe(path: Path | str) -> tuple[EnsembleRecipe, RecipeSource]:
    """Read, parse and validate an ensemble recipe.

    Args:
        path: the YAML file.

    Returns:
        The recipe and its source (for error messages with file and line).

    Raises:
        RecipeError: every problem found, one line each as ``file:line:col key: message``.
    """
    return load_recipe(path, EnsembleRecipe, check_ensemble_recipe)


def parse_ensemble_recipe(text: str, name: str = "<recipe>") -> tuple[EnsembleRecipe, RecipeSource]:
    """Like :func:`load_ensemble_recipe` for YAML text held in memory.

    Args:
        text: the YAML text.
        name: the name error messages give the text.

    Returns:
        The recipe and its source.

    Raises:
        RecipeError: the recipe is invalid (one line naming ``name``, line and key).

    Example:
        >>> recipe, _ = parse_ensemble_recipe("models:\\n  - model: ./a\\nmethod: prob_avg\\n")
        >>> recipe.method
        'prob_avg'
    """
    return parse_recipe(text, name, EnsembleRecipe, check_ensemble_recipe)
