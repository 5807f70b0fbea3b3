"""Recipe → Plan, reading only headers and configs.

A ``models:`` recipe is one implicit slice spanning every model's layers, with ``base_model``
appended as the last source when it is not listed. Each slice is planned layer by layer: output
layers are numbered consecutively across slices, source ``j`` reads its own layer
``start_j + i``, and gradients see ``t = i / (n - 1)`` within the slice (1 for a one-layer slice).
Embeddings come from the first slice's sources and the final norm and LM head from the last
slice's, at ``t = 0``. This is mergekit's planning, so its recipes mean the same thing here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from pydantic import BaseModel, ValidationError

from fusekit.arch import (
    LAYER_COUNT_KEYS,
    MODULES,
    block_of,
    blocks_by_prefix,
    is_embedding,
    is_lm_head,
    layer_index,
    module_of,
    restack_config,
    role,
    text_config,
    with_layer_index,
)
from fusekit.arch.config import Origin
from fusekit.errors import CheckpointError, RecipeError, TensorMismatchError
from fusekit.io.reader import CheckpointReader, open_reader, refuse_float8_without_dtype
from fusekit.io.refs import ResolvedModel, require_config, resolve_model
from fusekit.io.tokenizer import check_tokenizer_files, resolve_chat_template
from fusekit.ops import MergeMethod, get_method
from fusekit.plan.graph import Plan, TensorInput, TensorTask
from fusekit.recipe.params import ParameterScope
from fusekit.recipe.schema import MergeRecipe, ModelEntry, OutputModule, OutputSlice, ParameterValue
from fusekit.vocab import align_readers
from fusekit.vocab.align import plan_alignment, with_vocab_size

log = logging.getLogger("fusekit")

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


@dataclass(frozen=True)
class _Source:
    model: str
    start: int
    end: int
    parameters: dict[str, ParameterValue] | None


@dataclass(frozen=True)
class _Slice:
    sources: tuple[_Source, ...]
    base: str | None
    parameters: dict[str, ParameterValue] | None
    where: str  # for messages: "models" or "slices[2]"
    module_parameters: dict[str, ParameterValue] | None = None  # the parameters of its modules: entry

    @property
    def length(self) -> int:
        return self.sources[0].end - self.sources[0].start


def read_config(model: ResolvedModel) -> dict[str, Any]:
    """The model's config.json as a dict ({} when it has none)."""
    path = model.config_path
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise CheckpointError(f"model '{model.ref}': {path} is not valid JSON") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"model '{model.ref}': {path} is not a JSON object")
    return config


def count_layers(config: dict[str, Any], reader: CheckpointReader) -> int:
    """Number of the language model's blocks, from the config (its ``text_config`` in a
    vision-language model) or else from the tensor names."""
    counted = text_config(config)
    for key in LAYER_COUNT_KEYS:
        if isinstance(counted.get(key), int):
            return int(counted[key])
    text = [n for n in reader.names() if module_of(n) == "text_decoder"]
    indices = [i for i in map(layer_index, text) if i is not None]
    return max(indices) + 1 if indices else 0


def _is_text(name: str) -> bool:
    return module_of(name) == "text_decoder"


def _in_module(module: str) -> Callable[[str, _Source], bool]:
    return lambda name, source: module_of(name) == module


class PlanBuilder:
    """Builds a :class:`Plan`; holds the readers so headers are parsed once per file."""

    def __init__(self, recipe: MergeRecipe, *, recipe_text: str = "", allow_pickle: bool = False,
                 models: dict[str, ResolvedModel] | None = None, allow_crimes: bool = False) -> None:
        self.recipe = recipe
        self.recipe_text = recipe_text
        self.method: MergeMethod = get_method(recipe.merge_method)
        refs = recipe.model_refs()
        self.models = models or {ref: resolve_model(ref, allow_pickle=allow_pickle, base=recipe.base_model)
                                 for ref in refs}
        self.readers = {ref: open_reader(model) for ref, model in self.models.items()}
        self.configs = {ref: read_config(model) for ref, model in self.models.items()}
        if not allow_crimes:
            self._refuse_crimes()
        self.donor = recipe.base_model or refs[0] if refs else ""
        if recipe.base_model is None and recipe.models:
            self.donor = recipe.models[0].model
        elif recipe.base_model is None and recipe.slices:
            self.donor = recipe.slices[0].sources[0].model
        self.compute_dtype = DTYPES[recipe.dtype] if recipe.dtype else None
        self.out_dtype = DTYPES[recipe.out_dtype] if recipe.out_dtype else None
        if self.donor in self.models:
            require_config(self.models[self.donor], "the output's config.json is copied from it")
        if self.compute_dtype is None:
            refuse_float8_without_dtype(self.readers.values())
        self.vocab = plan_alignment(recipe, self.models, self.configs, self.readers, donor=self.donor,
                                    dtype=self.compute_dtype, source_model=self._tokenizer_source())
        self.readers = align_readers(self.readers, self.vocab)

    def _refuse_crimes(self) -> None:
        """Models of different types or architectures are refused, as mergekit does without
        ``--allow-crimes``: matching tensor names do not make the weights mean the same."""
        kinds = {ref: (c.get("model_type"), c.get("architectures")) for ref, c in self.configs.items() if c}
        if not kinds:
            return
        first_ref, first = next(iter(kinds.items()))
        for ref, kind in kinds.items():
            if kind != first:
                raise TensorMismatchError(
                    f"models '{first_ref}' ({_kind(first)}) and '{ref}' ({_kind(kind)}) have different "
                    "architectures; pass --allow-crimes (allow_crimes=True) to merge them anyway")

    def _text_part(self) -> tuple[list[ModelEntry] | None, list[OutputSlice] | None, OutputModule | None]:
        """The language model's ``models`` or ``slices``: the recipe's, or its ``text_decoder``
        module's (with that module entry)."""
        modules = self.recipe.modules
        if modules is None:
            return self.recipe.models, self.recipe.slices, None
        unknown = sorted(set(modules) - set(MODULES))
        if unknown:
            raise RecipeError(f"modules: unknown module '{unknown[0]}'; the modules are {', '.join(MODULES)}")
        text = modules.get("text_decoder")
        if text is None:
            raise RecipeError("modules: 'text_decoder' is missing; give the language model's slices or "
                              "models there")
        return text.models, text.slices, text
    # -- slices -------------------------------------------------------------------------------

    def slices(self) -> list[_Slice]:
        recipe = self.recipe
        models, slices, module = self._text_part()
        where, module_parameters = ("modules.text_decoder.", module.parameters) if module else ("", None)
        if slices is None:
            return [self._implicit_slice(models or [], module_parameters, f"{where}models")]
        result = []
        for i, out_slice in enumerate(slices):
            sources = tuple(_Source(s.model, *s.layer_range, s.parameters) for s in out_slice.sources)
            result.append(self._checked(_Slice(sources, out_slice.base_model or recipe.base_model,
                                               out_slice.parameters, f"{where}slices[{i}]",
                                               module_parameters)))
        return result

    def _implicit_slice(self, models: list[ModelEntry], module_parameters: dict[str, ParameterValue] | None,
                        where: str) -> _Slice:
        entries = [(m.model, m.parameters) for m in models]
        base = self.recipe.base_model
        if base is not None and base not in {ref for ref, _ in entries}:
            entries.append((base, None))
        counts = {ref: count_layers(self.configs[ref], self.readers[ref]) for ref, _ in entries}
        if len(set(counts.values())) > 1:
            listing = ", ".join(f"'{ref}' has {n}" for ref, n in counts.items())
            raise TensorMismatchError(f"the models have different numbers of layers ({listing}); "
                                      "use 'slices' with layer_range to choose layers")
        sources = tuple(_Source(ref, 0, counts[ref], params) for ref, params in entries)
        return self._checked(_Slice(sources, base, None, where, module_parameters))

    def _checked(self, out_slice: _Slice) -> _Slice:
        refs = [s.model for s in out_slice.sources]
        duplicates = sorted({r for r in refs if refs.count(r) > 1})
        if duplicates:
            raise RecipeError(f"{out_slice.where}: model '{duplicates[0]}' appears twice in one merge; "
                              "list each model once")
        if self.method.base == "required" and out_slice.base not in refs:
            raise RecipeError(f"{out_slice.where}: base model '{out_slice.base}' must be one of the "
                              f"sources that {self.method.name} merges; add it to the sources")
        for source in out_slice.sources:
            available = count_layers(self.configs[source.model], self.readers[source.model])
            if source.end > available:
                raise TensorMismatchError(
                    f"{out_slice.where}: layer_range [{source.start}, {source.end}] of model "
                    f"'{source.model}' goes past its {available} layers")
        return out_slice

    # -- tasks --------------------------------------------------------------------------------

    def build(self) -> Plan:
        slices = self.slices()
        tasks: list[TensorTask] = []
        first, last = slices[0], slices[-1]
        pre = self._shared_names(first, lambda name, source: role(name) == "pre" and _is_text(name))
        tasks += [self._task(name, [(s, name) for s in first.sources], first, 0.0) for name in pre]
        origins: list[Origin] = []
        for out_slice in slices:
            for i in range(out_slice.length):
                t = i / (out_slice.length - 1) if out_slice.length > 1 else 1.0
                tasks += self._layer_tasks(out_slice, i, len(origins), t)
                source = out_slice.sources[0]
                origins.append((self.configs[source.model], source.start + i))
        tasks += self._module_tasks(first)
        # mergekit pairs the last slice's sources with as many weights as the first slice has
        # sources, so only that many feed the final norm and head; the same here, for parity.
        post_slice = replace(last, sources=last.sources[:len(first.sources)])
        tasks += self._post_tasks(post_slice)
        self._check_unique([task.output for task in tasks])
        vocab = None
        if self.vocab is not None:  # embeddings and heads permuted into the output vocabulary
            tasks, vocab = self.vocab.attach(tasks, first_base=first.base, last_base=last.base)
        tokenizer_source = self._tokenizer_source()
        if tokenizer_source is not None:
            check_tokenizer_files(tokenizer_source.folder)
        writes_head = any(is_lm_head(task.output) for task in tasks)
        return Plan(recipe=self.recipe, recipe_text=self.recipe_text, models=self.models,
                    donor=self.donor, tasks=tuple(tasks),
                    out_config=with_vocab_size(self._out_config(origins if self._text_part()[1] else None,
                                                                untie=writes_head), vocab),
                    tokenizer_source=tokenizer_source, vocab=vocab,
                    chat_template=resolve_chat_template(self.recipe.chat_template, tokenizer_source))

    def _layer_tasks(self, out_slice: _Slice, i: int, out_layer: int, t: float) -> list[TensorTask]:
        first = out_slice.sources[0]
        names = self._shared_names(out_slice, lambda name, source: layer_index(name) == source.start + i
                                   and _is_text(name), lambda name: with_layer_index(name, 0))
        if not names:
            raise TensorMismatchError(f"model '{first.model}' has no tensors for layer "
                                      f"{first.start + i}; check layer_range")
        tasks = []
        for name in names:
            inputs = [(s, with_layer_index(name, s.start + i)) for s in out_slice.sources]
            tasks.append(self._task(with_layer_index(name, out_layer), inputs, out_slice, t))
        return tasks

    def _post_tasks(self, last: _Slice) -> list[TensorTask]:
        post = self._shared_names(last, lambda name, source: role(name) == "post" and not is_lm_head(name)
                                  and _is_text(name))
        tasks = [self._task(name, [(s, name) for s in last.sources], last, 0.0) for name in post]
        # An LM head is written when any input has one; tied inputs give their embedding.
        heads = {n for s in last.sources for n in self.readers[s.model].names() if is_lm_head(n)}
        for head in sorted(heads):
            inputs = [(s, self._head_or_embedding(s.model, head)) for s in last.sources]
            tasks.append(self._task(head, inputs, last, 0.0))
        return tasks

    def _module_tasks(self, first: _Slice) -> list[TensorTask]:
        """The other modules' tensors (vision tower, projector): merged whole with the models a
        ``models:`` recipe (or the module's own entry) lists, else copied from the base."""
        tasks = []
        modules = sorted({module_of(n) for n in self.readers[self.donor].names()} - {"text_decoder"})
        for module in modules:
            out_slice, method = self._module_slice(module, first)
            names = self._shared_names(out_slice, _in_module(module))
            counts = {prefix: max(indices) + 1 for prefix, indices in blocks_by_prefix(names).items()}
            for name in names:
                block = block_of(name)
                n = counts[block[0]] if block else 1
                t = (block[1] / (n - 1) if n > 1 else 1.0) if block else 0.0
                tasks.append(self._task(name, [(s, name) for s in out_slice.sources], out_slice, t, method))
        return tasks

    def _module_slice(self, module: str, first: _Slice) -> tuple[_Slice, MergeMethod | None]:
        entry = (self.recipe.modules or {}).get(module)
        if entry is not None and entry.slices:
            raise RecipeError(f"modules.{module}: slices of a {module} are not supported; merge it "
                              "whole with 'models:', or leave it out to copy the base model's")
        if entry is not None:
            base = self.recipe.base_model
            entries = [(m.model, m.parameters) for m in entry.models or []]
            if base is not None and base not in {ref for ref, _ in entries}:
                entries.append((base, None))
            sources = tuple(_Source(ref, 0, 0, params) for ref, params in entries)
            return self._checked(_Slice(sources, base, None, f"modules.{module}", entry.parameters)), None
        if self.recipe.modules is None and self.recipe.models is not None:
            return first, None
        copy = _Slice((_Source(self.donor, 0, 0, None),), None, None, module)
        return copy, get_method("passthrough")

    def _shared_names(self, out_slice: _Slice, selects: Callable[[str, _Source], bool],
                      key: Callable[[str], str] = lambda name: name) -> list[str]:
        """Names the first source's selection holds, after checking every source holds the same
        set (compared by ``key``, e.g. with the layer index blanked)."""
        first = out_slice.sources[0]
        names = [n for n in self.readers[first.model].names() if selects(n, first)]
        expected = {key(n): n for n in names}
        for source in out_slice.sources[1:]:
            found = {key(n): n for n in self.readers[source.model].names() if selects(n, source)}
            for extra in found.keys() - expected.keys():
                raise TensorMismatchError(
                    f"tensor '{found[extra]}' is in model '{source.model}' but missing from "
                    f"'{first.model}'; the models do not share an architecture")
            for lacking in expected.keys() - found.keys():
                raise TensorMismatchError(
                    f"tensor '{expected[lacking]}' is in model '{first.model}' but missing from "
                    f"'{source.model}'; the models do not share an architecture")
        return names

    def _head_or_embedding(self, model: str, head: str) -> str:
        """A tied model has no LM head tensor; its input embedding plays that part."""
        reader = self.readers[model]
        if head in reader:
            return head
        embeddings = [n for n in reader.names() if is_embedding(n)]
        if not embeddings:
            raise TensorMismatchError(f"tensor '{head}' is missing from model '{model}' and it has "
                                      "no tied input embedding to use instead")
        return embeddings[0]

    def _task(self, output: str, inputs: Sequence[tuple[_Source, str]], out_slice: _Slice,
              t: float, method: MergeMethod | None = None) -> TensorTask:
        if method is not None:  # another method for this tensor: a copy of the base's
            saved, self.method = self.method, method
            try:
                return self._task(output, inputs, out_slice, t)
            finally:
                self.method = saved
        infos = [TensorInput(s.model, name, *self._shape_dtype(s.model, name)) for s, name in inputs]
        self._check_shapes(output, infos)
        scope = self._scope(out_slice)
        base = None
        contributing = list(zip([s for s, _ in inputs], infos, strict=True))
        if self.method.base != "unused" and out_slice.base is not None:
            base = next((info for s, info in contributing if s.model == out_slice.base), None)
            contributing = [(s, info) for s, info in contributing if s.model != out_slice.base]
        model_params = tuple(self._model_params(scope, s.model, info.name, t) for s, info in contributing)
        params = self._resolve(self.method.method_params, scope, output, t, None, output)
        native = _promote([i.dtype for i in infos])
        compute = self.compute_dtype or native
        out_dtype = self.out_dtype or self.method.result_dtype(compute)
        if not native.is_floating_point:  # integer buffers are copied as they are
            compute = out_dtype = native
        return TensorTask(output=output, method=self.method.name,
                          inputs=tuple(info for _, info in contributing), model_params=model_params,
                          params=params, base=base, shape=infos[0].shape, compute_dtype=compute,
                          out_dtype=out_dtype, t=t)

    def _shape_dtype(self, model: str, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        info = self.readers[model].info(name)
        return info.shape, info.dtype

    @staticmethod
    def _check_shapes(output: str, infos: list[TensorInput]) -> None:
        first = infos[0]
        for other in infos[1:]:
            if other.shape != first.shape:
                hint = ("the vocabularies differ; merge models that share a tokenizer"
                        if role(output) == "pre" or is_lm_head(output)
                        else "the models do not share an architecture")
                raise TensorMismatchError(
                    f"tensor '{output}': shape {list(first.shape)} in '{first.model}' "
                    f"({first.name}) but {list(other.shape)} in '{other.model}' ({other.name}); {hint}")

    def _scope(self, out_slice: _Slice) -> ParameterScope:
        per_model: dict[str, list[dict[str, ParameterValue]]] = {}
        for source in out_slice.sources:
            if source.parameters:
                per_model.setdefault(source.model, []).append(source.parameters)
        shared = [p for p in (out_slice.parameters, out_slice.module_parameters, self.recipe.parameters) if p]
        return ParameterScope(per_model=per_model, shared=shared)

    def _model_params(self, scope: ParameterScope, model: str, name: str, t: float) -> BaseModel:
        return self._resolve(self.method.model_params, scope, name, t, model, name)

    def _resolve(self, params_model: type[BaseModel], scope: ParameterScope, filter_name: str,
                 t: float, model: str | None, output: str) -> BaseModel:
        values: dict[str, Any] = {}
        for field_name, field in params_model.model_fields.items():
            key = field.alias or field_name
            value = scope.lookup(key, filter_name, t, model)
            if value is not None:
                values[key] = value
        try:
            return params_model.model_validate(values)
        except ValidationError as exc:
            raise RecipeError(self._param_error(exc, model, output)) from None

    def _param_error(self, exc: ValidationError, model: str | None, output: str) -> str:
        error = exc.errors()[0]
        key = str(error["loc"][0]) if error["loc"] else "?"
        whose = f"model '{model}'" if model else "the merge"
        if error["type"] == "missing":
            place = "that model's parameters" if model else "the top-level parameters"
            return (f"{self.method.name} needs parameter '{key}' for {whose} (tensor '{output}'); "
                    f"set it in {place} or the top-level parameters")
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"parameter '{key}' for {whose} at tensor '{output}': {message}"

    @staticmethod
    def _check_unique(names: list[str]) -> None:
        seen: set[str] = set()
        for name in names:
            if name in seen:
                raise TensorMismatchError(f"output tensor '{name}' would be written twice; check "
                                          "that slices do not overlap in the output")
            seen.add(name)

    # -- files beside the weights -------------------------------------------------------------

    def _out_config(self, origins: list[Origin] | None, *, untie: bool) -> dict[str, Any]:
        """The donor's config, with the layers the slices stacked (``origins``: each output layer's
        source config and layer, None when the layers are the inputs') and the output dtype."""
        config = dict(self.configs[self.donor])
        if origins is not None:
            config = restack_config(config, origins)
        if untie and config.get("tie_word_embeddings"):
            # The merged head differs from the merged embedding; a tied config would discard it.
            log.warning("the base config ties the LM head to the embeddings, but other models have "
                        "their own heads; the output gets a merged head and tie_word_embeddings: "
                        "false")
            config["tie_word_embeddings"] = False
        dtype = self.recipe.out_dtype or self.recipe.dtype
        if dtype:
            # transformers 5 writes "dtype"; configs saved by older versions say "torch_dtype"
            key = "torch_dtype" if "torch_dtype" in config and "dtype" not in config else "dtype"
            config[key] = dtype
        return config

    def _tokenizer_source(self) -> ResolvedModel | None:
        recipe = self.recipe
        source = recipe.tokenizer.source if recipe.tokenizer else recipe.tokenizer_source
        if source in (None, "base", "union"):  # a union starts from the base's tokenizer files
            return self.models[self.donor]
        if source in self.models:
            return self.models[source]
        return resolve_model(source)


def _kind(kind: tuple[Any, Any]) -> str:
    model_type, architectures = kind
    names = ", ".join(map(str, architectures)) if isinstance(architectures, list) else architectures
    return f"model_type {model_type}, architectures {names}"


def _promote(dtypes: Sequence[torch.dtype]) -> torch.dtype:
    result = dtypes[0]
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def build_plan(recipe: MergeRecipe, *, recipe_text: str = "", allow_pickle: bool = False,
               allow_crimes: bool = False) -> Plan:
    """Resolve models, read their headers and configs, and plan every output tensor.

    Reads no tensor data: shapes and dtypes come from the checkpoints' headers.

    Args:
        recipe: a validated merge recipe.
        recipe_text: its YAML as written (copied into the output and its lock).
        allow_pickle: accept ``.bin``/``.pt`` inputs (loaded with ``weights_only=True``).
        allow_crimes: merge models whose ``model_type`` or ``architectures`` differ (refused
            otherwise, as mergekit does without ``--allow-crimes``).

    Returns:
        The plan: one task per output tensor, in write order, and the output config.

    Raises:
        CheckpointNotFoundError: a model reference points at nothing usable.
        CheckpointError: a checkpoint or its config cannot be read.
        TensorMismatchError: the models' tensors, shapes or layer counts disagree.
        RecipeError: a parameter cannot be applied to these models.

    Example:
        >>> recipe, _ = load_merge_recipe("configs/linear.yaml")  # doctest: +SKIP
        >>> len(build_plan(recipe).tasks)  # doctest: +SKIP
        21
    """
    return PlanBuilder(recipe, recipe_text=recipe_text, allow_pickle=allow_pickle,
                       allow_crimes=allow_crimes).build()
