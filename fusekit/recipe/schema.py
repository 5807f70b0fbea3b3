"""Pydantic models for merge recipes, in mergekit's YAML format.

A recipe names a ``merge_method`` and either ``models`` (every model contributes every tensor) or
``slices`` (layer ranges stacked into a new model). ``parameters`` may sit at the top level, on a
model, on an output slice or on a slice source; each value is a scalar, a gradient (a list of numbers
interpolated across the layers) or a list of ``{filter, value}`` entries matched against tensor names.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from fusekit.recipe.load import short_repr
from fusekit.recipe.numbers import Seed, finite_float, is_number

DTypeName = Literal["float32", "float16", "bfloat16", "float64"]

_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                  "float": "float32", "fp64": "float64", "double": "float64"}


def _normalise_dtype(value: Any) -> Any:
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        return _DTYPE_ALIASES.get(name, name)
    return value


DType = Annotated[DTypeName, BeforeValidator(_normalise_dtype)]

Scalar = float | bool | str
Gradient = tuple[float, ...] | tuple[bool | str, ...]


@dataclass(frozen=True)
class Filtered:
    """One ``{filter, value}`` entry; ``filter`` None or ``"*"`` matches every tensor."""

    filter: str | None
    value: Scalar | Gradient


ParameterValue = Scalar | Gradient | tuple[Filtered, ...]


def _parse_scalar_or_gradient(value: Any) -> Scalar | Gradient:
    if isinstance(value, (bool, str)):
        return value
    if is_number(value):
        return finite_float(value)
    if isinstance(value, list) and value and all(is_number(v) for v in value):
        return tuple(finite_float(v) for v in value)
    if isinstance(value, list) and value and all(isinstance(v, (bool, str)) for v in value):
        return tuple(value)  # a step list: each layer takes the entry at floor(t · (n − 1))
    raise ValueError(
        f"must be a number, a list of numbers (a gradient across layers) or a list of "
        f"{{filter, value}} entries, got {short_repr(value)}"
    )


def parse_parameter_value(value: Any) -> ParameterValue:
    """Turn one YAML parameter value into a scalar, a gradient or filtered entries."""
    if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        entries = []
        for entry in value:
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                raise ValueError(
                    "each filtered entry must be {filter: <tensor name part>, value: <number>}, "
                    f"got {short_repr(entry)}"
                )
            flt = entry.get("filter")
            if flt is not None and not isinstance(flt, str):
                raise ValueError(f"filter must be a string, got {short_repr(flt)}")
            entries.append(Filtered(filter=flt, value=_parse_scalar_or_gradient(entry["value"])))
        return tuple(entries)
    return _parse_scalar_or_gradient(value)


Parameters = dict[str, Annotated[Any, BeforeValidator(parse_parameter_value)]]


def _parse_model_ref(value: Any) -> Any:
    """Accept ``"path[@revision]"``, ``"base+adapter"`` (a LoRA adapter applied to its base) or
    mergekit's ``{model: {path, revision}, lora: {path, revision}}`` / ``{path, revision}``."""
    if isinstance(value, dict):
        if set(value) - {"model", "lora", "path", "revision"}:
            raise ValueError(f"a model reference takes model and lora (or path and revision), got keys "
                             f"{sorted(value)}")
        model = _model_path(value.get("model", value) if "model" in value else
                            {k: v for k, v in value.items() if k != "lora"})
        lora = value.get("lora")
        return model if lora is None else f"{model}+{_model_path(lora)}"
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("a model reference must not be empty")
        return value
    raise ValueError(f"a model reference must be a path or Hub id string, got {short_repr(value)}")


def _model_path(inner: Any) -> str:
    """mergekit's ``{path, revision}`` (or a plain string) → ``"path[@revision]"``."""
    if isinstance(inner, str) and inner.strip():
        return inner
    if not isinstance(inner, dict) or set(inner) - {"path", "revision"} or "path" not in inner:
        raise ValueError("a model reference needs 'path' (and optional 'revision'), "
                         f"got {short_repr(inner)}")
    path, revision = inner["path"], inner.get("revision")
    return f"{path}@{revision}" if revision else str(path)


ModelRefText = Annotated[str, BeforeValidator(_parse_model_ref)]


MAX_LAYERS = 100_000  # a bound on layer indices far above any model's depth


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _fold_revision(data: Any) -> Any:
    """``{model: org/name, revision: v2}`` (``revision`` beside ``model``, as some recipes write it)
    means ``model: org/name@v2``. mergekit 0.1.5 ignores the key and reads the default branch;
    fusekit reads the revision the recipe names."""
    if not isinstance(data, dict) or data.get("revision") is None or "model" not in data:
        return data
    revision = data["revision"]
    if not isinstance(revision, str) or not revision.strip() or "@" in revision or "/" in revision:
        raise ValueError(f"revision must be a branch, tag or commit name, got {short_repr(revision)}")
    model = _parse_model_ref(data["model"])
    base, plus, adapter = str(model).partition("+")
    path, at, existing = base.rpartition("@")
    if at and path and existing and "/" not in existing:
        if existing != revision:
            raise ValueError(f"model '{model}' names revision '{existing}' and the entry says revision: "
                             f"'{revision}'; keep one")
        base = path
    return {**data, "model": f"{base}@{revision}{plus}{adapter}", "revision": None}


class ModelEntry(_Strict):
    """One entry of ``models:``; a ``revision`` beside ``model`` is read as ``model@revision``."""

    model: ModelRefText
    parameters: Parameters | None = None
    revision: str | None = Field(default=None, description="the model's Hub revision (branch, tag or "
                                 "commit); the same as writing model: NAME@REVISION")

    _revision = model_validator(mode="before")(_fold_revision)


class SliceSource(_Strict):
    """One source of an output slice: ``layer_range`` [start, end) of ``model`` (``revision`` as in
    :class:`ModelEntry`)."""

    model: ModelRefText
    layer_range: tuple[int, int]
    parameters: Parameters | None = None
    revision: str | None = Field(default=None, description="the model's Hub revision (branch, tag or "
                                 "commit); the same as writing model: NAME@REVISION")

    _revision = model_validator(mode="before")(_fold_revision)

    @field_validator("layer_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        start, end = value
        if not 0 <= start < end <= MAX_LAYERS:
            raise ValueError(f"layer_range must be [start, end) with 0 <= start < end <= {MAX_LAYERS}, "
                             f"got {short_repr(list(value))}")
        return value


def _not_supported_yet(what: str) -> Any:
    """A validator refusing a mergekit key fusekit recognises but does not implement: a recipe that
    sets it must not merge as if it were absent."""

    def refuse(value: Any) -> Any:
        if value is not None:
            raise ValueError(f"mergekit's '{what}' is recognised but not supported by fusekit yet; "
                             "remove it (fusekit will not merge as if it were absent)")
        return value

    return BeforeValidator(refuse)


class OutputSlice(_Strict):
    """One entry of ``slices:``; its sources are merged layer by layer.

    mergekit's ``residual_weight`` is refused: it is recognised but not supported yet.
    """

    sources: list[SliceSource] = Field(min_length=1)
    base_model: ModelRefText | None = None
    residual_weight: Annotated[float | None, _not_supported_yet("residual_weight")] = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _same_length(self) -> OutputSlice:
        lengths = {s.layer_range[1] - s.layer_range[0] for s in self.sources}
        if len(lengths) > 1:
            ranges = ", ".join(f"{s.model} {list(s.layer_range)}" for s in self.sources)
            raise ValueError(f"all sources of a slice must span the same number of layers: {ranges}")
        return self


class ModelTokenSource(_Strict):
    """``{kind: model_token, model, token | token_id}``: the row of one token of one model."""

    kind: Literal["model_token"]
    model: ModelRefText
    token: str | None = None
    token_id: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_token(self) -> ModelTokenSource:
        if (self.token is None) == (self.token_id is None):
            raise ValueError("give exactly one of 'token' and 'token_id'")
        return self


class ZeroSource(_Strict):
    """``{kind: zero}``: a row of zeros."""

    kind: Literal["zero"]


class TokenEmbedding(_Strict):
    """One entry of ``tokenizer.tokens``: where a token's embedding and LM-head rows come from.

    ``source`` is a model (its own row for the token), a ``model_token`` or ``zero``; ``force``
    uses it for every model, even those that have the token.
    """

    source: ModelTokenSource | ZeroSource | ModelRefText | None = None
    force: bool = False


class TokenizerConfig(_Strict):
    """mergekit's ``tokenizer:`` block: the output vocabulary (``union``, ``base`` or a model's),
    per-token embedding sources, and padding of the vocabulary to a multiple of a number."""

    source: ModelRefText = "union"
    tokens: dict[str, TokenEmbedding] | None = None
    pad_to_multiple_of: int | None = Field(default=None, ge=1, le=2**20)

    def token_models(self) -> list[str]:
        """Every model the ``tokens`` entries name."""
        models = []
        for entry in (self.tokens or {}).values():
            source = entry.source
            if isinstance(source, ModelTokenSource):
                models.append(source.model)
            elif isinstance(source, str):
                models.append(source)
        return models


class OutputModule(_Strict):
    """One entry of mergekit's ``modules:`` block (``text_decoder``, ``vision_tower``,
    ``multi_modal_projector``): that module's ``slices`` or ``models``, and its ``parameters``."""

    slices: list[OutputSlice] | None = None
    models: list[ModelEntry] | None = None
    parameters: Parameters | None = None

    @model_validator(mode="after")
    def _models_or_slices(self) -> OutputModule:
        if (not self.models) == (not self.slices):
            raise ValueError("a module takes either 'models' or 'slices' (exactly one, not empty)")
        return self


class MergeRecipe(_Strict):
    """A whole merge recipe (``fusekit merge``), accepted in mergekit's format."""

    name: str | None = None  # a stage's name (fusekit.recipe.stages); a one-stage recipe ignores it
    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    modules: dict[str, OutputModule] | None = None
    base_model: ModelRefText | None = None
    parameters: Parameters | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: ModelRefText | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None
    # What the merge writes: a full model (default) or, when every input is a LoRA adapter over one
    # base, an adapter (fusekit.lora.adapter_recipe); ``rank`` is the SVD combination types' rank.
    output: Literal["model", "adapter"] | None = None
    rank: Annotated[int, Field(ge=1)] | None = None
    # The seed of a stochastic method (DARE, DELLA, ...), pinned by the recipe: --random-seed overrides it,
    # and it overrides a lock's seed (fusekit.merging.explicit_seed).
    random_seed: Annotated[Seed, Field(strict=True)] | None = None

    @model_validator(mode="before")
    @classmethod
    def _legacy_tokenizer_source(cls, data: Any) -> Any:
        """mergekit's old ``tokenizer_source: model:<path>`` is ``tokenizer_source: <path>``."""
        source = data.get("tokenizer_source") if isinstance(data, dict) else None
        if isinstance(source, str) and source.startswith("model:"):
            return {**data, "tokenizer_source": source.removeprefix("model:").strip()}
        return data

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeRecipe:
        if [self.models, self.slices, self.modules].count(None) != 2:
            raise ValueError("give either 'models' or 'slices' (or mergekit's 'modules'), exactly one")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty; list at least one model")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer', not both")
        refs = self.model_refs()
        for model in self.tokenizer.token_models() if self.tokenizer else []:
            if model not in refs:
                raise ValueError(f"tokenizer.tokens names model '{model}', which the recipe does not "
                                 f"merge; use one of {', '.join(repr(r) for r in refs)}")
        return self

    def model_refs(self) -> list[str]:
        """Every model the recipe mentions, in first-mention order, without duplicates."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for entry in self.models or []:
            refs.append(entry.model)
        for out_slice in self.all_slices():
            if out_slice.base_model:
                refs.append(out_slice.base_model)
            refs.extend(source.model for source in out_slice.sources)
        for module in (self.modules or {}).values():
            refs.extend(entry.model for entry in module.models or [])
        return list(dict.fromkeys(refs))

    def all_slices(self) -> list[OutputSlice]:
        """The top-level slices and every module's, in order."""
        module_slices = [s for m in (self.modules or {}).values() for s in m.slices or []]
        return [*(self.slices or []), *module_slices]
