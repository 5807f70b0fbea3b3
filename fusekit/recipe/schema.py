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
from fusekit.recipe.numbers import finite_float, is_number

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
    """Accept ``"path[@revision]"`` or mergekit's ``{model: {path, revision}}`` / ``{path, revision}``."""
    if isinstance(value, dict):
        inner = value.get("model", value)
        if set(value) - {"model", "path", "revision"}:
            raise ValueError(
                f"a model reference takes path and revision, got keys {sorted(value)}; "
                "LoRA adapters ('lora') are not supported yet"
            )
        if isinstance(inner, dict):
            if set(inner) - {"path", "revision"} or "path" not in inner:
                raise ValueError("a model reference needs 'path' (and optional 'revision'), "
                                 f"got {short_repr(inner)}")
            path, revision = inner["path"], inner.get("revision")
            return f"{path}@{revision}" if revision else str(path)
        return inner
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("a model reference must not be empty")
        if "+" in value and not value.endswith(".safetensors"):
            raise ValueError(f"LoRA references ('model+adapter') are not supported yet: {short_repr(value)}")
        return value
    raise ValueError(f"a model reference must be a path or Hub id string, got {short_repr(value)}")


ModelRefText = Annotated[str, BeforeValidator(_parse_model_ref)]


MAX_LAYERS = 100_000  # a bound on layer indices far above any model's depth


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelEntry(_Strict):
    """One entry of ``models:``."""

    model: ModelRefText
    parameters: Parameters | None = None


class SliceSource(_Strict):
    """One source of an output slice: ``layer_range`` [start, end) of ``model``."""

    model: ModelRefText
    layer_range: tuple[int, int]
    parameters: Parameters | None = None

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


class TokenizerConfig(_Strict):
    """mergekit's ``tokenizer:`` block; only ``source`` is supported, ``tokens`` and
    ``pad_to_multiple_of`` (tokenizer surgery) are recognised and refused."""

    source: ModelRefText | None = None
    tokens: Annotated[Any, _not_supported_yet("tokenizer.tokens")] = None
    pad_to_multiple_of: Annotated[Any, _not_supported_yet("tokenizer.pad_to_multiple_of")] = None


class MergeRecipe(_Strict):
    """A whole merge recipe (``fusekit merge``), accepted in mergekit's format."""

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[OutputSlice] | None = None
    base_model: ModelRefText | None = None
    parameters: Parameters | None = None
    dtype: DType | None = None
    out_dtype: DType | None = None
    tokenizer_source: ModelRefText | None = None
    tokenizer: TokenizerConfig | None = None
    chat_template: str | None = None

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeRecipe:
        if (self.models is None) == (self.slices is None):
            raise ValueError("give either 'models' or 'slices' (exactly one of them)")
        if self.models is not None and not self.models:
            raise ValueError("'models' is empty; list at least one model")
        if self.tokenizer_source is not None and self.tokenizer is not None:
            raise ValueError("give either 'tokenizer_source' or 'tokenizer', not both")
        return self

    def model_refs(self) -> list[str]:
        """Every model the recipe mentions, in first-mention order, without duplicates."""
        refs: list[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for entry in self.models or []:
            refs.append(entry.model)
        for out_slice in self.slices or []:
            if out_slice.base_model:
                refs.append(out_slice.base_model)
            refs.extend(source.model for source in out_slice.sources)
        return list(dict.fromkeys(refs))
