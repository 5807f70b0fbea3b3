"""The router recipe (``fusekit route build router.yaml OUT``): schema and loader.

A router recipe names the candidate ``models`` (the same entries as a merge recipe, plus an optional
``cost`` and ``name``), the ``data`` to learn from, how each example is ``labels``-ed, which
``features`` describe a query, which ``router`` learns the choice, and how the router is
``calibrate``-d against cost. It is read with the merge recipes' YAML loader, so mistakes are reported
the same way: ``router.yaml:7:11 models[1].cost: must be >= 0, got -1.0``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from fusekit.io.refs import hub_repo_id, split_revision
from fusekit.recipe.load import Location, RecipeSource, load_recipe, parse_recipe
from fusekit.recipe.numbers import Seed
from fusekit.recipe.schema import ModelRefText


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def default_name(ref: str) -> str:
    """The name a model gets when its entry has none: the Hub repo's or the folder's last part."""
    repo = hub_repo_id(ref)
    if repo is not None:
        return repo.rsplit("/", 1)[-1]
    name, _ = split_revision(ref)
    path = Path(name)
    return (path.parent.name if path.suffix == ".safetensors" else path.name) or name


class RouteModel(_Strict):
    """One entry of ``models:``: a model the router may send a query to."""

    model: ModelRefText
    name: str | None = None
    cost: float = 1.0

    @field_validator("cost")
    @classmethod
    def _price(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"must be a finite number >= 0 (the relative price of one call), got {value}")
        return value

    @property
    def label(self) -> str:
        """How data labels, reports and the saved router call this model."""
        return self.name or default_name(self.model)


def _method_shorthand(value: Any) -> Any:
    return {"method": value} if isinstance(value, str) else value


def _type_shorthand(value: Any) -> Any:
    return {"type": value} if isinstance(value, str) else value


def _share_shorthand(value: Any) -> Any:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return {"share": value}
    return value


class Labels(_Strict):
    """``labels:`` — where each training example's best model comes from.

    ``given``: the data's ``label`` field names the model. ``loss``: every model scores the example in
    bits per byte and the best one is the label (no human labels needed). ``pairwise``: two models;
    the second is the label only where its bits per byte beat the first's by more than ``margin``
    (a fraction: 0.02 means 2% lower).
    """

    method: Literal["given", "loss", "pairwise"] = "loss"
    margin: float = Field(default=0.0, ge=0.0, lt=1.0)
    batch_size: int = Field(default=8, ge=1)
    context: int | None = Field(default=None, ge=2)


class TfidfFeatures(_Strict):
    """Character n-gram TF-IDF of the query: no model needed."""

    type: Literal["tfidf"]
    ngram_range: tuple[int, int] = (1, 4)
    max_features: int = Field(default=4096, ge=2)
    lowercase: bool = True

    @field_validator("ngram_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 1 <= value[0] <= value[1] <= 8:
            raise ValueError(f"must be [low, high] with 1 <= low <= high <= 8, got {list(value)}")
        return value


class HiddenFeatures(_Strict):
    """Mean-pooled hidden states of a causal LM loaded by fusekit's model loader."""

    type: Literal["hidden"]
    model: ModelRefText
    layer: int = -1
    max_tokens: int = Field(default=256, ge=1)
    batch_size: int = Field(default=16, ge=1)


class EmbeddingFeatures(_Strict):
    """Mean-pooled, normalised output of a local sentence-transformers (transformers encoder) folder."""

    type: Literal["embedding"]
    model: ModelRefText
    max_tokens: int = Field(default=256, ge=1)
    batch_size: int = Field(default=16, ge=1)


Features = Annotated[TfidfFeatures | HiddenFeatures | EmbeddingFeatures, Field(discriminator="type")]


class KnnRouter(_Strict):
    """Per model, the mean cosine similarity of the ``k`` nearest examples it won; softmax at
    ``temperature``."""

    type: Literal["knn"]
    k: int = Field(default=16, ge=1)
    temperature: float = Field(default=0.02, gt=0.0)


class LogisticRouter(_Strict):
    """Multinomial logistic regression with L2 penalty ``weight_decay``."""

    type: Literal["logistic"]
    epochs: int = Field(default=300, ge=1)
    lr: float = Field(default=0.05, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)


class MlpRouter(_Strict):
    """One hidden layer of ``hidden`` units (GELU), trained with AdamW."""

    type: Literal["mlp"]
    hidden: int = Field(default=64, ge=1)
    epochs: int = Field(default=300, ge=1)
    lr: float = Field(default=0.01, gt=0.0)
    weight_decay: float = Field(default=1e-3, ge=0.0)
    dropout: float = Field(default=0.1, ge=0.0, lt=1.0)


class MfRouter(_Strict):
    """RouteLLM-style matrix factorisation: score(model, query) = w · (v_model ⊙ W x)."""

    type: Literal["mf"]
    dim: int = Field(default=32, ge=1)
    epochs: int = Field(default=300, ge=1)
    lr: float = Field(default=0.01, gt=0.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)


class ArrowRouter(_Strict):
    """Arrow (Ostapenko et al. 2024) over LoRA adapters of one base, run by PEFT (``peft.ArrowConfig``):
    in every adapted layer each token goes to the ``top_k`` adapters whose top right singular vector of
    ΔW = B A best matches its hidden state (|cosine|), weighted by a softmax at ``router_temperature``.
    No data and no training. ``use_gks`` (GenKnowSub) first subtracts the mean of the general
    ``gks_adapters`` from every adapter; ``rng_seed`` seeds PEFT's power iteration."""

    type: Literal["arrow"]
    top_k: int = Field(default=2, ge=1)
    router_temperature: float = Field(default=1.0, gt=0.0, allow_inf_nan=False)
    use_gks: bool = False
    gks_adapters: list[ModelRefText] = Field(default_factory=list)
    rng_seed: Seed = 0

    @model_validator(mode="after")
    def _gks(self) -> ArrowRouter:
        if self.use_gks and not self.gks_adapters:
            raise ValueError("use_gks: true subtracts the mean of general adapters; list them as "
                             "gks_adapters")
        if self.gks_adapters and not self.use_gks:
            raise ValueError("gks_adapters are used only with use_gks: true; set it, or drop them")
        return self


RouterSpec = Annotated[KnnRouter | LogisticRouter | MlpRouter | MfRouter, Field(discriminator="type")]
"""The recipe's ``router:`` settings, one of four kinds; :func:`fusekit.route.fitted.fit_router` trains it."""

AnyRouterSpec = Annotated[KnnRouter | LogisticRouter | MlpRouter | MfRouter | ArrowRouter,
                          Field(discriminator="type")]
"""A fitted router's settings, or ``arrow`` (nothing to fit: :mod:`fusekit.route.arrow`)."""

_DATA_KEYS = ("labels", "features", "calibrate", "threshold", "folds", "fold_block")
"""Keys that shape a router learned from data: an Arrow recipe refuses them."""


class Calibrate(_Strict):
    """``calibrate:`` — the share of calls that should go to models dearer than the cheapest, set on
    ``data`` (a JSONL file of queries like the expected traffic; no labels needed) when given, else on
    the cross-validated predictions of the training data."""

    share: float = Field(ge=0.0, le=1.0)
    data: str | None = None


class RouteRecipe(_Strict):
    """A whole router recipe (``fusekit route build``): the models with their costs, the training
    data, and how to label, featurize, fit and calibrate. Unknown keys are refused."""

    models: list[RouteModel] = Field(min_length=1)
    data: str | None = None
    labels: Annotated[Labels, BeforeValidator(_method_shorthand)] = Labels()
    features: Annotated[Features, BeforeValidator(_type_shorthand)] = TfidfFeatures(type="tfidf")
    router: Annotated[AnyRouterSpec, BeforeValidator(_type_shorthand)] = KnnRouter(type="knn")
    calibrate: Annotated[Calibrate | None, BeforeValidator(_share_shorthand)] = None
    threshold: float | None = Field(default=None, ge=0.0, le=1.0)
    folds: int = Field(default=5, ge=0)
    fold_block: int = Field(default=25, ge=1)
    seed: Seed = 0

    @field_validator("data")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be the path of a JSONL file")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> RouteRecipe:
        if isinstance(self.router, ArrowRouter):
            given = [key for key in _DATA_KEYS if key in self.model_fields_set]
            if given:
                raise ValueError(f"router: arrow needs no data and learns nothing, so "
                                 f"{', '.join(repr(k) for k in given)} has no effect; remove it")
            return self
        if self.data is None:
            raise ValueError(f"'data' (a JSONL file of examples) is required for router: "
                             f"{self.router.type}; only router: arrow works without data")
        if self.calibrate is not None and self.threshold is not None:
            raise ValueError("give either 'calibrate' (a target share) or 'threshold', not both")
        if self.folds == 1:
            raise ValueError("'folds' must be 0 (no held-out predictions) or at least 2")
        if self.calibrate is not None and self.calibrate.data is None and self.folds == 0:
            raise ValueError("'calibrate' sets the threshold on held-out predictions; give 'folds' >= 2, "
                             "or queries to calibrate on as calibrate.data")
        return self

    @property
    def names(self) -> list[str]:
        """The models' names (their ``name``, else the reference), in recipe order."""
        return [entry.label for entry in self.models]


def _check(recipe: RouteRecipe) -> list[tuple[Location, str]]:
    problems: list[tuple[Location, str]] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(recipe.models):
        if entry.label in seen:
            problems.append((("models", index), f"two models are called '{entry.label}' (models["
                             f"{seen[entry.label]}] too); give one of them a distinct 'name'"))
        seen.setdefault(entry.label, index)
    if isinstance(recipe.router, ArrowRouter) and recipe.router.top_k > len(recipe.models):
        problems.append((("router", "top_k"), f"{recipe.router.top_k} is more than the "
                         f"{len(recipe.models)} adapters in 'models'; use at most {len(recipe.models)}"))
    if recipe.labels.method == "pairwise" and len(recipe.models) != 2:
        problems.append((("labels",), f"pairwise labels compare exactly two models, the recipe lists "
                         f"{len(recipe.models)}; use 'loss' for more"))
    if recipe.calibrate is not None and len({entry.cost for entry in recipe.models}) < 2:
        problems.append((("calibrate",), "every model has the same cost, so no call is dearer than "
                         "another; give the models different 'cost' values or drop 'calibrate'"))
    return problems


def load_route_recipe(path: Path | str) -> tuple[RouteRecipe, RecipeSource]:
    """Read, parse and validate a router recipe.

    Only the recipe is checked here; models and data are opened by :func:`fusekit.route.build_router`.

    Args:
        path: the YAML recipe file.

    Returns:
        The :class:`RouteRecipe` and its source (text and line marks, for messages).

    Raises:
        RecipeError: the file is missing or invalid; one line naming file, line and key.

    Example:
        >>> recipe, _ = load_route_recipe("configs/route/tfidf-knn.yaml")  # doctest: +SKIP
        >>> recipe.names  # doctest: +SKIP
        ['python', 'c', 'prose']
    """
    return load_recipe(path, RouteRecipe, _check)


def parse_route_recipe(text: str, name: str = "<router recipe>") -> tuple[RouteRecipe, RecipeSource]:
    """Like :func:`load_route_recipe` for YAML text held in memory.

    Args:
        text: the recipe's YAML.
        name: what messages call it, in place of a file name.

    Returns:
        The :class:`RouteRecipe` and its source.

    Raises:
        RecipeError: the text is not a valid router recipe.

    Example:
        >>> text = "models: [{model: ./a}, {model: ./b, name: b}]\\ndata: train.jsonl\\n"
        >>> parse_route_recipe(text)[0].names
        ['a', 'b']
    """
    return parse_recipe(text, name, RouteRecipe, _check)
