"""``fusekit moe``: plan an upcycled MoE from headers and configs, compute its gates, stream it out.

The dense base gives every tensor except the MLPs; each expert model gives one expert per layer
(its MLP, copied, optionally with noise and rescaled); the routers are computed up front (one
forward pass of the base for ``hidden`` gates) and saved in a small temporary checkpoint that the
executor reads like one more model. Everything else streams tensor by tensor through the same
executor and atomic writer as ``fusekit merge``, under the same ``--max-memory`` bound.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fusekit.arch import is_embedding, layer_index, role
from fusekit.errors import CheckpointError, RecipeError, TensorMismatchError
from fusekit.io.reader import CheckpointReader
from fusekit.io.refs import ResolvedModel, resolve_model
from fusekit.io.tokenizer import copy_generation_config, copy_tokenizer
from fusekit.io.writer import atomic_output, check_output_folder, write_json, write_text
from fusekit.moe import layout
from fusekit.moe.card import moe_card
from fusekit.moe.gates import prompt_gates, random_gates, save_gates
from fusekit.moe.recipe import PROMPT_GATES, Expert, MoeRecipe, load_moe_recipe
from fusekit.ops.moe import ExpertNoiseModelParams
from fusekit.ops.passthrough import PassthroughModelParams
from fusekit.ops.registry import NoParams
from fusekit.plan.build import DTYPES, read_config
from fusekit.plan.executor import ExecutionStats, Executor
from fusekit.plan.graph import Plan, TensorInput, TensorTask
from fusekit.recipe.schema import MergeRecipe

log = logging.getLogger("fusekit")
GATES = "<gates>"  # the temporary checkpoint holding the computed router weights
RECIPE_COPY = "mergekit_moe_config.yml"
DEFAULT_SHARED_SHARE = 0.5


@dataclass(frozen=True)
class MoePlan:
    """What ``fusekit moe`` will write, known from headers and configs alone.

    Attributes:
        recipe / recipe_text: the validated recipe and its YAML as written.
        architecture: ``mixtral`` or ``qwen2_moe``.
        plan: one task per output tensor; router tensors read from :data:`GATES`, which exists
            only once the gates are computed (see :func:`run_moe`).
        router_names / shared_gate_names: the computed tensors, one per layer.
        layers / hidden: the base's depth and width.
        base_bytes: the base model's weights in float32 (what a ``hidden`` gate pass loads).
    """

    recipe: MoeRecipe
    recipe_text: str
    architecture: str
    plan: Plan
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
        return sum(len(e.positive_prompts or []) + len(e.negative_prompts or [])
                   for e in self.recipe.experts)


@dataclass(frozen=True)
class MoeResult:
    out_dir: Path
    moe_plan: MoePlan
    stats: ExecutionStats
    seed: int


def plan_moe(recipe: str | Path, *, allow_pickle: bool = False,
             allow_identical_experts: bool = False) -> MoePlan:
    """Validate an MoE recipe against its models' configs and headers and plan every tensor."""
    parsed, _, text = load_moe_recipe(recipe, allow_identical_experts=allow_identical_experts)
    return _Planner(parsed, text, allow_pickle=allow_pickle).build()


class _Planner:
    def __init__(self, recipe: MoeRecipe, text: str, *, allow_pickle: bool) -> None:
        self.recipe = recipe
        self.text = text
        self.models = {ref: resolve_model(ref, allow_pickle=allow_pickle) for ref in recipe.expert_refs()}
        self.readers = {ref: CheckpointReader(m) for ref, m in self.models.items()}
        self.configs = {ref: read_config(m) for ref, m in self.models.items()}
        self.base = recipe.base_model
        self.shared: Expert | None = recipe.shared_experts[0] if recipe.shared_experts else None

    # -- checks ---------------------------------------------------------------------------------

    def _architecture(self) -> str:
        base_type = self.configs[self.base].get("model_type")
        if not self.configs[self.base]:
            raise CheckpointError(f"base_model '{self.base}': {self.models[self.base].folder} has no "
                                  "config.json; the MoE config is built from it")
        named = self.recipe.architecture
        arch = named or ("qwen2_moe" if self.shared else "mixtral")
        if base_type not in layout.SOURCE_TYPES[arch]:
            fits = [a for a, types in layout.SOURCE_TYPES.items() if base_type in types]
            hint = (f"; model_type {base_type} can become {' or '.join(fits)}" if fits else "")
            if arch == "mixtral" and "qwen2_moe" in fits and not named:
                hint += " (qwen2_moe needs one entry in shared_experts)"
            raise RecipeError(f"base_model '{self.base}' has model_type '{base_type}', which "
                              f"{arch} cannot be built from (it takes "
                              f"{', '.join(layout.SOURCE_TYPES[arch])}){hint}")
        for where, expert in self._expert_entries():
            their = self.configs[expert.source_model].get("model_type")
            if their != base_type:
                raise TensorMismatchError(
                    f"{where} '{expert.source_model}' has model_type '{their}' but the base "
                    f"'{self.base}' has '{base_type}'; every expert must share the base's architecture")
        return arch

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
        arch = self._architecture()
        config = self.configs[self.base]
        base_reader = self.readers[self.base]
        names = list(base_reader.names())
        qkv_bias = layout.check_attention(arch, self.base, names)
        layers = int(config.get("num_hidden_layers") or 0)
        mlp = self._mlp_tensors(layers)
        self._check_expert_shapes(mlp)
        embedding = next((n for n in names if is_embedding(n)), None)
        if embedding is None:
            raise TensorMismatchError(f"base_model '{self.base}' has no input embedding tensor")
        hidden = base_reader.info(embedding).shape[1]
        out_dtype = self._out_dtype(base_reader.info(embedding).dtype)
        tasks: list[TensorTask] = []
        routers, shared_gates = [], []
        for name in names:
            if role(name) == "pre":
                tasks.append(self._copy(self.base, name, name, out_dtype))
        for layer in range(layers):
            t = layer / (layers - 1) if layers > 1 else 0.0
            for name in names:
                if layer_index(name) == layer and layout.dense_mlp_tensor(name) is None:
                    tasks.append(self._copy(self.base, name, name, out_dtype, t=t))
            routers.append(layout.router_name(arch, layer))
            tasks.append(self._gate(routers[-1], (len(self.recipe.experts), hidden), out_dtype, t))
            for index, expert in enumerate(self.recipe.experts):
                for part in layout.MLP_PARTS:
                    tasks.append(self._expert(expert, mlp[layer][part].name,
                                              layout.expert_name(arch, layer, index, part),
                                              out_dtype, t, routed=True))
            if self.shared is not None:
                for part in layout.MLP_PARTS:
                    tasks.append(self._expert(self.shared, mlp[layer][part].name,
                                              layout.shared_expert_name(layer, part), out_dtype, t,
                                              routed=False))
                shared_gates.append(layout.shared_gate_name(layer))
                tasks.append(self._gate(shared_gates[-1], (1, hidden), out_dtype, t))
        for name in names:
            if role(name) == "post":
                tasks.append(self._copy(self.base, name, name, out_dtype, t=0.0))
        shared_width = (base_reader.info(mlp[0]["gate_proj"].name).shape[0]
                        if self.shared is not None and layers else None)
        dtype_name = next(k for k, v in DTYPES.items() if v == out_dtype)
        out_config = layout.output_config(arch, config, experts=len(self.recipe.experts),
                                          per_token=self.recipe.experts_per_token, qkv_bias=qkv_bias,
                                          shared_intermediate=shared_width, dtype=dtype_name)
        stand_in = MergeRecipe.model_validate({  # what the executor sees: copies of one model each
            "merge_method": "passthrough", "models": [{"model": ref} for ref in self.models]})
        plan = Plan(recipe=stand_in, recipe_text=self.text, models=self.models, donor=self.base,
                    tasks=tuple(tasks), out_config=out_config, tokenizer_source=self.models[self.base])
        base_bytes = sum(base_reader.info(n).nbytes // base_reader.info(n).dtype.itemsize * 4
                         for n in names)
        return MoePlan(recipe=self.recipe, recipe_text=self.text, architecture=arch, plan=plan,
                       router_names=tuple(routers), shared_gate_names=tuple(shared_gates),
                       layers=layers, hidden=hidden, base_bytes=base_bytes)

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
            else:  # the shared expert's gate is zero: sigmoid(0) = 1/2 is undone here
                scale = 2.0 * shared_share
            scale = None if scale == 1.0 else scale
        return self._copy(expert.source_model, name, output, out_dtype, t=t, scale=scale,
                          noise=expert.noise_scale)

    @staticmethod
    def _gate(name: str, shape: tuple[int, int], out_dtype: torch.dtype, t: float) -> TensorTask:
        source = TensorInput(GATES, name, shape, torch.float32)
        return TensorTask(output=name, method="passthrough", inputs=(source,),
                          model_params=(PassthroughModelParams(scale=None),), params=NoParams(), base=None,
                          shape=shape, compute_dtype=torch.float32, out_dtype=out_dtype, t=t)


# -- running ------------------------------------------------------------------------------------


def compute_gates(moe_plan: MoePlan, *, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Every router (and shared-expert gate) tensor, in float32, by output name."""
    recipe = moe_plan.recipe
    experts = len(recipe.experts)
    if recipe.gate_mode in PROMPT_GATES:
        base = moe_plan.plan.models[recipe.base_model]
        embedding = next(n for n in CheckpointReader(base).names() if is_embedding(n))
        gates = prompt_gates(recipe.gate_mode, recipe.base_model, base, recipe.experts,
                             layers=moe_plan.layers, embedding=embedding, device=device)
        gc.collect()  # the base model loaded for hidden gates is no longer referenced
    else:
        gates = random_gates(recipe.gate_mode, moe_plan.router_names, experts, moe_plan.hidden, seed)
    tensors = dict(zip(moe_plan.router_names, gates, strict=True))
    for name in moe_plan.shared_gate_names:  # always on at sigmoid(0) = 1/2, undone in its down_proj
        tensors[name] = torch.zeros(1, moe_plan.hidden)
    return tensors


def run_moe(recipe: str | Path, out_dir: str | Path, *, overwrite: bool = False,
            out_shard_size: int | None = 5 * 10**9, max_memory: int | None = 10**9,
            device: str = "cpu", random_seed: int | None = None, allow_pickle: bool = False,
            allow_identical_experts: bool = False, progress: bool = False) -> MoeResult:
    """Build the MoE a recipe describes into ``out_dir``, a transformers-loadable model.

    Args:
        recipe: path of an MoE recipe (mergekit-moe's format).
        out_dir: output folder; it appears only once complete.
        overwrite: replace an existing non-empty ``out_dir``.
        out_shard_size: largest shard in bytes (None: one file).
        max_memory: bound on resident memory while tensors stream (the ``hidden`` gate pass
            loads the base model once before that).
        device: where the ``hidden`` gate pass runs: ``cpu``, ``cuda`` or ``auto``.
        random_seed: seed for ``random``/``uniform_random`` gates and expert noise; None picks one,
            which is logged (when used) and written to the model card.
        allow_pickle: accept ``.bin``/``.pt`` inputs.
        allow_identical_experts: allow every expert to be the same model (for training later).
        progress: show a progress bar on stderr.

    Example:
        >>> run_moe("configs/moe/mixtral.yaml", "./moe")  # doctest: +SKIP
    """
    from fusekit.device import resolve_device
    from fusekit.merging import pick_seed

    resolve_device(device)  # a bad --device fails before any work
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    moe_plan = plan_moe(recipe, allow_pickle=allow_pickle, allow_identical_experts=allow_identical_experts)
    if moe_plan.recipe.shared_experts and moe_plan.recipe.shared_experts[0].positive_prompts:
        log.warning("shared_experts[0]: its prompts are not used; the shared expert is always on, "
                    "with the share of the MLP output its residual_scale gives (default 0.5)")
    seed = pick_seed(random_seed, stochastic=moe_plan.stochastic)
    gates = compute_gates(moe_plan, device=device, seed=seed)
    with tempfile.TemporaryDirectory(prefix="fusekit-moe-gates-") as folder:
        gate_model: ResolvedModel = save_gates(gates, Path(folder))
        plan = replace(moe_plan.plan, models={**moe_plan.plan.models, GATES: gate_model})
        executor = Executor(plan, device=torch.device("cpu"), max_shard_bytes=out_shard_size,
                            seed=seed, max_memory=max_memory, pipelined=True, progress=progress)
        with atomic_output(out_dir, overwrite=overwrite) as temp:
            stats = executor.run(temp)
            _write_side_files(moe_plan, temp, name=out_dir.name, seed=seed)
    stats = replace(stats, files=tuple(out_dir / f.name for f in stats.files))
    return MoeResult(out_dir=out_dir, moe_plan=moe_plan, stats=stats, seed=seed)


def _write_side_files(moe_plan: MoePlan, out: Path, *, name: str, seed: int) -> None:
    plan = moe_plan.plan
    _check_config(plan.out_config)
    write_json(out / "config.json", plan.out_config)
    base = plan.models[moe_plan.recipe.base_model]
    copy_generation_config(base, out)
    copy_tokenizer(base, out)
    write_text(out / "README.md", moe_card(moe_plan, name=name, seed=seed))
    write_text(out / RECIPE_COPY, moe_plan.recipe_text)


def _check_config(config: dict[str, Any]) -> None:
    """Have the installed transformers (when present) parse the config it will load."""
    try:
        from transformers import AutoConfig
    except ImportError:
        return
    try:
        AutoConfig.for_model(**config)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"the installed transformers rejects the MoE config built from the "
                              f"base: {str(exc).splitlines()[0]}") from None
