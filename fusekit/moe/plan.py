"""Plan an upcycled MoE from recipes, configs and tensor headers alone (no tensor data).

:func:`plan_moe` checks that the base and every expert share an architecture and shapes, and lists
one task per output tensor: the base's attention, norms, embeddings and head copied; each expert's
MLP copied (optionally with noise, rescaled) into its expert slot of every layer; the routers read
from :data:`GATES`, a small checkpoint that :func:`fusekit.moe.run_moe` computes before streaming.
The tasks form a :class:`~fusekit.plan.TaskGraph`, which the merge executor runs as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusekit.arch import is_embedding, layer_index, role
from fusekit.errors import CheckpointError, RecipeError, TensorMismatchError
from fusekit.io.reader import open_reader
from fusekit.io.refs import resolve_model
from fusekit.moe import layout
from fusekit.moe.recipe import PROMPT_GATES, QWEN_FAMILY, Expert, MoeRecipe, load_moe_recipe
from fusekit.ops.moe import ExpertNoiseModelParams
from fusekit.ops.passthrough import PassthroughModelParams
from fusekit.ops.registry import NoParams
from fusekit.plan.build import DTYPES, read_config
from fusekit.plan.graph import TaskGraph, TensorInput, TensorTask

GATES = "<gates>"  # the temporary checkpoint holding the computed router weights
DEFAULT_SHARED_SHARE = 0.5


@dataclass(frozen=True)
class MoePlan:
    """What ``fusekit moe`` will write, known from headers and configs alone.

    Attributes:
        recipe / recipe_text: the validated recipe and its YAML as written.
        architecture: ``mixtral``, ``qwen2_moe``, ``qwen3_moe`` or ``deepseek``.
        graph: one task per output tensor and the models they read; router tensors read from
            :data:`GATES`, which exists only once the gates are computed (see
            :func:`fusekit.moe.run_moe`).
        out_config: config.json of the MoE.
        router_names / shared_gate_names: the computed tensors, one per layer.
        layers / hidden: the base's depth and width.
        base_bytes: the base model's weights in float32 (what a ``hidden`` gate pass loads).
    """

    recipe: MoeRecipe
    recipe_text: str
    architecture: str
    graph: TaskGraph
    out_config: dict[str, Any]
    router_names: tuple[str, ...]
    shared_gate_names: tuple[str, ...]
    layers: int
    hidden: int
    base_bytes: int

    @property
    def stochastic(self) -> bool:
        """Whether the output depends on the random seed."""
        noisy = any(e.noise_scale for e in [*self.recipe.experts, *(self.recipe.shared_experts or [])])
        return noisy or self.recipe.gate_mode not in PROMPT_GATES

    @property
    def prompt_count(self) -> int:
        """How many prompts (positive and negative, all experts) the gates are computed from."""
        return sum(len(e.positive_prompts or []) + len(e.negative_prompts or [])
                   for e in self.recipe.experts)


def plan_moe(recipe: str | Path, *, allow_pickle: bool = False,
             allow_identical_experts: bool = False) -> MoePlan:
    """Validate an MoE recipe against its models' configs and headers and plan every tensor.

    Args:
        recipe: path of an MoE recipe (mergekit-moe's format).
        allow_pickle: accept ``.bin``/``.pt`` inputs.
        allow_identical_experts: allow every expert to be the same model.

    Returns:
        The plan; no tensor data is read.

    Raises:
        RecipeError: the recipe is malformed or asks for something its models cannot give.
        CheckpointError: the base has no config.json.
        TensorMismatchError: an expert's architecture, layers or shapes differ from the base's.

    Example:
        >>> plan_moe("configs/moe/mixtral-hidden.yaml").architecture  # doctest: +SKIP
        'mixtral'
    """
    parsed, _, text = load_moe_recipe(recipe, allow_identical_experts=allow_identical_experts)
    return _Planner(parsed, text, allow_pickle=allow_pickle).build()


class _Planner:
    def __init__(self, recipe: MoeRecipe, text: str, *, allow_pickle: bool) -> None:
        self.recipe = recipe
        self.text = text
        self.models = {ref: resolve_model(ref, allow_pickle=allow_pickle, base=recipe.base_model)
                       for ref in recipe.expert_refs()}
        self.readers = {ref: open_reader(m) for ref, m in self.models.items()}
        self.configs = {ref: read_config(m) for ref, m in self.models.items()}
        self.base = recipe.base_model
        self.shared: Expert | None = recipe.shared_experts[0] if recipe.shared_experts else None
        self.arch = ""  # the output architecture, once build() has chosen it

    # -- checks ---------------------------------------------------------------------------------

    def _architecture(self) -> str:
        base_type = self.configs[self.base].get("model_type")
        if not self.configs[self.base]:
            raise CheckpointError(f"base_model '{self.base}': {self.models[self.base].folder} has no "
                                  "config.json; the MoE config is built from it")
        named = self.recipe.architecture
        arch = self._choose(named, base_type)
        if base_type not in layout.SOURCE_TYPES[arch]:
            fits = [a for a, types in layout.SOURCE_TYPES.items() if base_type in types]
            hint = (f"; model_type {base_type} can become {' or '.join(fits)}" if fits else "")
            if arch == "mixtral" and "qwen2_moe" in fits and not named:
                hint += " (qwen2_moe needs one entry in shared_experts)"
            if named == QWEN_FAMILY:
                hint += (" (architecture: qwen is Qwen2-MoE with one shared expert, Qwen3-MoE for "
                         "Qwen3 models without one; mergekit-moe refuses this too)")
            raise RecipeError(f"base_model '{self.base}' has model_type '{base_type}', which "
                              f"{arch} cannot be built from (it takes "
                              f"{', '.join(layout.SOURCE_TYPES[arch])}){hint}")
        if arch == "qwen3_moe" and self.configs[self.base].get("use_sliding_window"):
            raise RecipeError(f"base_model '{self.base}' uses sliding-window attention "
                              "(use_sliding_window: true), which Qwen3-MoE would apply to every "
                              "layer; use a base with full attention")
        for where, expert in self._expert_entries():
            their = self.configs[expert.source_model].get("model_type")
            if their != base_type:
                raise TensorMismatchError(
                    f"{where} '{expert.source_model}' has model_type '{their}' but the base "
                    f"'{self.base}' has '{base_type}'; every expert must share the base's architecture")
        return arch

    def _choose(self, named: str | None, base_type: object) -> str:
        """The output architecture: as named, or as mergekit-moe picks it (``qwen``: Qwen2-MoE with
        a shared expert, else Qwen3-MoE; unnamed: Qwen2-MoE with a shared expert, Qwen3-MoE for a
        Qwen3 base, else Mixtral)."""
        if named is not None and named != QWEN_FAMILY:
            return named
        if self.shared is not None:
            return "qwen2_moe"
        return "qwen3_moe" if base_type == "qwen3" or named == QWEN_FAMILY else "mixtral"

    def _expert_entries(self) -> list[tuple[str, Expert]]:
        entries = [(f"experts[{i}]", e) for i, e in enumerate(self.recipe.experts)]
        return entries + [(f"shared_experts[{i}]", e) for i, e in enumerate(self.recipe.shared_experts or [])]

    def _mlp_tensors(self, layers: int) -> dict[int, dict[str, layout.MlpTensor]]:
        """The base's MLP projections by layer and part; every layer must have all three."""
        found: dict[int, dict[str, layout.MlpTensor]] = {}
        for name in self.readers[self.base].names():
            tensor = layout.dense_mlp_tensor(name)
            if tensor is not None:
                found.setdefault(tensor.layer, {})[tensor.part] = tensor
        for layer in range(layers):
            missing = [p for p in layout.MLP_PARTS if p not in found.get(layer, {})]
            if missing:
                raise TensorMismatchError(f"base_model '{self.base}' has no tensor "
                                          f"'model.layers.{layer}.mlp.{missing[0]}.weight'; the base "
                                          "must be a Llama-style dense model")
        return found

    def _check_expert_shapes(self, mlp: dict[int, dict[str, layout.MlpTensor]]) -> None:
        base_reader = self.readers[self.base]
        for where, expert in self._expert_entries():
            reader = self.readers[expert.source_model]
            for parts in mlp.values():
                for tensor in parts.values():
                    want = base_reader.info(tensor.name).shape
                    if tensor.name not in reader:
                        raise TensorMismatchError(f"{where} '{expert.source_model}' has no tensor "
                                                  f"'{tensor.name}'; experts must have the base's layers")
                    got = reader.info(tensor.name).shape
                    if got != want:
                        raise TensorMismatchError(
                            f"tensor '{tensor.name}': shape {list(got)} in {where} "
                            f"'{expert.source_model}' but {list(want)} in the base '{self.base}'; "
                            "experts must have the base's shapes")
            extra = [n for n in reader.names() if (layer_index(n) or 0) >= len(mlp)]
            if extra:
                raise TensorMismatchError(f"{where} '{expert.source_model}' has more layers than the "
                                          f"base '{self.base}' ('{extra[0]}'); experts must have the "
                                          "base's layers")

    # -- plan -----------------------------------------------------------------------------------

    def build(self) -> MoePlan:
        """Check the models against each other and list every output tensor's task."""
        arch = self.arch = self._architecture()
        config = self.configs[self.base]
        base_reader = self.readers[self.base]
        names = list(base_reader.names())
        attention_bias = layout.check_attention(arch, self.base, names)
        layers = int(config.get("num_hidden_layers") or 0)
        mlp = self._mlp_tensors(layers)
        self._check_expert_shapes(mlp)
        embedding = next((n for n in names if is_embedding(n)), None)
        if embedding is None:
            raise TensorMismatchError(f"base_model '{self.base}' has no input embedding tensor")
        hidden = base_reader.info(embedding).shape[1]
        out_dtype = self._out_dtype(base_reader.info(embedding).dtype)
        routers = [layout.router_name(arch, layer) for layer in range(layers)]
        shared_gates = [layout.shared_gate_name(layer) for layer in range(layers)] \
            if self.shared is not None and arch in layout.GATED_SHARED else []
        tasks = [self._copy(self.base, name, name, out_dtype) for name in names if role(name) == "pre"]
        for layer in range(layers):
            tasks += self._layer_tasks(arch, layer, layers, names, mlp, hidden, out_dtype)
        tasks += [self._copy(self.base, name, name, out_dtype) for name in names if role(name) == "post"]
        shared_width = (base_reader.info(mlp[0]["gate_proj"].name).shape[0]
                        if self.shared is not None and layers else None)
        dtype_name = next(k for k, v in DTYPES.items() if v == out_dtype)
        out_config = layout.output_config(arch, config, experts=len(self.recipe.experts),
                                          per_token=self.recipe.experts_per_token,
                                          attention_bias=attention_bias, shared=int(self.shared is not None),
                                          shared_intermediate=shared_width, dtype=dtype_name)
        base_bytes = sum(base_reader.info(n).nbytes // base_reader.info(n).dtype.itemsize * 4
                         for n in names)
        return MoePlan(recipe=self.recipe, recipe_text=self.text, architecture=arch,
                       graph=TaskGraph(models=self.models, tasks=tuple(tasks)), out_config=out_config,
                       router_names=tuple(routers), shared_gate_names=tuple(shared_gates),
                       layers=layers, hidden=hidden, base_bytes=base_bytes)

    def _layer_tasks(self, arch: str, layer: int, layers: int, names: list[str],
                     mlp: dict[int, dict[str, layout.MlpTensor]], hidden: int,
                     out_dtype: torch.dtype) -> list[TensorTask]:
        """One layer's tasks in write order: the base's non-MLP tensors, the router, the routed
        experts' projections, then the shared expert and its gate."""
        t = layer / (layers - 1) if layers > 1 else 0.0
        tasks = [self._copy(self.base, name, name, out_dtype, t=t) for name in names
                 if layer_index(name) == layer and layout.dense_mlp_tensor(name) is None]
        tasks.append(self._gate(layout.router_name(arch, layer), (len(self.recipe.experts), hidden),
                                out_dtype, t))
        for index, expert in enumerate(self.recipe.experts):
            tasks += [self._expert(expert, mlp[layer][part].name,
                                   layout.expert_name(arch, layer, index, part), out_dtype, t, routed=True)
                      for part in layout.MLP_PARTS]
        if self.shared is not None:
            tasks += [self._expert(self.shared, mlp[layer][part].name,
                                   layout.shared_expert_name(arch, layer, part), out_dtype, t, routed=False)
                      for part in layout.MLP_PARTS]
            if arch in layout.GATED_SHARED:
                tasks.append(self._gate(layout.shared_gate_name(layer), (1, hidden), out_dtype, t))
        return tasks

    def _out_dtype(self, stored: torch.dtype) -> torch.dtype:
        if self.recipe.dtype:
            return DTYPES[self.recipe.dtype]
        config = self.configs[self.base]
        named = config.get("dtype") or config.get("torch_dtype")
        if isinstance(named, str) and named.removeprefix("torch.") in DTYPES:
            return DTYPES[named.removeprefix("torch.")]
        return stored

    def _input(self, model: str, name: str) -> TensorInput:
        info = self.readers[model].info(name)
        return TensorInput(model, name, info.shape, info.dtype)

    def _copy(self, model: str, name: str, output: str, out_dtype: torch.dtype, *, t: float = 0.0,
              scale: float | None = None, noise: float | None = None) -> TensorTask:
        source = self._input(model, name)
        exact = scale is None and not noise
        compute = source.dtype if exact or not source.dtype.is_floating_point else \
            torch.promote_types(source.dtype, torch.float32)
        out = out_dtype if source.dtype.is_floating_point else source.dtype
        params: Any
        if noise:
            method, params = "expert_noise", ExpertNoiseModelParams(noise_scale=noise, scale=scale)
        else:
            method, params = "passthrough", PassthroughModelParams(scale=scale)
        return TensorTask(output=output, method=method, inputs=(source,), model_params=(params,),
                          params=NoParams(), base=None, shape=source.shape, compute_dtype=compute,
                          out_dtype=out, t=t)

    def _expert(self, expert: Expert, name: str, output: str, out_dtype: torch.dtype, t: float, *,
                routed: bool) -> TensorTask:
        scale: float | None = None
        if name.endswith("down_proj.weight"):
            shared_share = DEFAULT_SHARED_SHARE
            if self.shared is not None and self.shared.residual_scale is not None:
                shared_share = self.shared.residual_scale
            if routed:
                scale = expert.residual_scale
                if self.shared is not None:
                    scale = (1.0 if scale is None else scale) * (1.0 - shared_share)
            elif self.arch in layout.GATED_SHARED:  # its gate is zero: sigmoid(0) = 1/2 undone here
                scale = 2.0 * shared_share
            else:  # DeepSeek-MoE adds the shared expert ungated
                scale = shared_share
            scale = None if scale == 1.0 else scale
        return self._copy(expert.source_model, name, output, out_dtype, t=t, scale=scale,
                          noise=expert.noise_scale)

    @staticmethod
    def _gate(name: str, shape: tuple[int, int], out_dtype: torch.dtype, t: float) -> TensorTask:
        source = TensorInput(GATES, name, shape, torch.float32)
        return TensorTask(output=name, method="passthrough", inputs=(source,),
                          model_params=(PassthroughModelParams(scale=None),), params=NoParams(), base=None,
                          shape=shape, compute_dtype=torch.float32, out_dtype=out_dtype, t=t)
