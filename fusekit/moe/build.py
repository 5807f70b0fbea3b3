"""``fusekit moe``: compute an upcycled MoE's gates and stream it out, as :mod:`fusekit.moe.plan` planned.

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
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from fusekit.arch import is_embedding
from fusekit.errors import CheckpointError
from fusekit.io.files import write_json, write_text
from fusekit.io.lock import seal_output
from fusekit.io.outputs import claim_output, model_inputs
from fusekit.io.reader import open_reader
from fusekit.io.refs import ResolvedModel
from fusekit.io.tokenizer import copy_generation_config, copy_tokenizer
from fusekit.io.writer import atomic_output, check_output_folder
from fusekit.moe.card import moe_card
from fusekit.moe.gates import prompt_gates, random_gates, save_gates
from fusekit.moe.plan import GATES, MoePlan, plan_moe
from fusekit.moe.recipe import PROMPT_GATES
from fusekit.plan.executor import ExecutionStats, Executor
from fusekit.plan.graph import TaskGraph

log = logging.getLogger("fusekit")
RECIPE_COPY = "mergekit_moe_config.yml"


@dataclass(frozen=True)
class MoeResult:
    """The written MoE folder and what the run did.

    Attributes:
        out_dir: the output folder.
        moe_plan: the plan it was built from.
        stats: what the executor did.
        seed: the seed of random gates and expert noise (recorded in the model card).
    """

    out_dir: Path
    moe_plan: MoePlan
    stats: ExecutionStats
    seed: int


def compute_gates(moe_plan: MoePlan, *, device: str, seed: int) -> dict[str, torch.Tensor]:
    """Every router (and shared-expert gate) tensor, in float32, by output name.

    Args:
        moe_plan: the plan naming the routers.
        device: where a ``hidden`` gate pass runs the base model.
        seed: seed of ``random`` and ``uniform_random`` gates.

    Returns:
        ``[experts, hidden]`` per router, ``[1, hidden]`` zeros per shared-expert gate.

    Raises:
        RecipeError: a prompt gives no tokens, or an expert's prompts give no direction.
    """
    recipe = moe_plan.recipe
    experts = len(recipe.experts)
    if recipe.gate_mode in PROMPT_GATES:
        base = moe_plan.graph.models[recipe.base_model]
        embedding = next(n for n in open_reader(base).names() if is_embedding(n))
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

    Returns:
        The output folder, the plan, the executor's statistics and the seed used.

    Raises:
        FusekitError: the recipe, the models or the output folder cannot be used (see
            :func:`fusekit.moe.plan_moe`), or writing failed.

    Example:
        >>> run_moe("configs/moe/mixtral-hidden.yaml", "./moe")  # doctest: +SKIP
    """
    from fusekit.device import resolve_device
    from fusekit.merging import pick_seed

    started = time.perf_counter()  # the summary's seconds: the whole run, gate pass included
    resolve_device(device)  # a bad --device fails before any work
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    moe_plan = plan_moe(recipe, allow_pickle=allow_pickle, allow_identical_experts=allow_identical_experts)
    inputs = [*model_inputs(moe_plan.graph.models.values()), ("recipe", Path(recipe))]
    _warn(moe_plan)
    seed = pick_seed(random_seed, stochastic=moe_plan.stochastic)
    # Claimed before the gate pass (which can take minutes), so a second run refuses at once.
    with claim_output(out_dir, inputs=inputs, overwrite=overwrite), \
            tempfile.TemporaryDirectory(prefix="fusekit-moe-gates-") as folder:
        gate_model: ResolvedModel = save_gates(compute_gates(moe_plan, device=device, seed=seed),
                                               Path(folder))
        graph = TaskGraph(models={**moe_plan.graph.models, GATES: gate_model}, tasks=moe_plan.graph.tasks)
        executor = Executor(graph, device=torch.device("cpu"), max_shard_bytes=out_shard_size,
                            seed=seed, max_memory=max_memory, pipelined=True, progress=progress)
        with atomic_output(out_dir, overwrite=overwrite) as temp:
            stats = executor.run(temp)
            _write_side_files(moe_plan, temp, name=out_dir.name, seed=seed)
            seal_output(temp, kind="moe", recipe_text=moe_plan.recipe_text, recipe_name=Path(recipe).name)
    stats = replace(stats, files=tuple(out_dir / f.name for f in stats.files),
                    seconds=time.perf_counter() - started)
    return MoeResult(out_dir=out_dir, moe_plan=moe_plan, stats=stats, seed=seed)


def _warn(moe_plan: MoePlan) -> None:
    """One line each for what the run will do differently from what the recipe may suggest."""
    recipe = moe_plan.recipe
    if recipe.shared_experts and recipe.shared_experts[0].positive_prompts:
        log.warning("shared_experts[0]: its prompts are not used; the shared expert is always on, "
                    "with the share of the MLP output its residual_scale gives (default 0.5)")
    if len(recipe.experts) > 1 and len({e.source_model for e in recipe.experts}) == 1:
        log.warning("every expert is the same model '%s' (allowed by --allow-identical-experts): the "
                    "MoE computes what that model does until it is trained", recipe.experts[0].source_model)


def _write_side_files(moe_plan: MoePlan, out: Path, *, name: str, seed: int) -> None:
    _check_config(moe_plan.out_config)
    write_json(out / "config.json", moe_plan.out_config)
    base = moe_plan.graph.models[moe_plan.recipe.base_model]
    copy_generation_config(base, out)
    copy_tokenizer(base, out)
    write_text(out / "README.md", moe_card(moe_plan, name=name, seed=seed))
    write_text(out / RECIPE_COPY, moe_plan.recipe_text)


def _check_config(config: dict[str, Any]) -> None:
    """Have the installed transformers (when present) parse the config it will load (not a config
    whose modelling code lives on the Hub, as DeepSeek-MoE's does)."""
    if "auto_map" in config:
        return
    try:
        from transformers import AutoConfig
    except ImportError:
        return
    try:
        AutoConfig.for_model(**config)
    except (ValueError, TypeError, KeyError) as exc:
        raise CheckpointError(f"the installed transformers rejects the MoE config built from the "
                              f"base: {str(exc).splitlines()[0]}") from None
