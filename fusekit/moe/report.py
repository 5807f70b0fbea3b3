"""Human and JSON descriptions of an MoE plan, for ``fusekit plan`` on an MoE recipe."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fusekit.io.layout import TensorSpec, plan_shards
from fusekit.moe.plan import GATES, MoePlan, plan_moe
from fusekit.plan.memory import memory_estimate
from fusekit.plan.report import human_bytes


def moe_plan_summary(moe_plan: MoePlan, *, max_shard_bytes: int | None,
                     max_memory: int | None) -> dict[str, Any]:
    """Machine-readable summary: experts, gates, layers, bytes, shards and peak memory."""
    graph, recipe = moe_plan.graph, moe_plan.recipe
    specs = [TensorSpec(t.output, t.shape, t.out_dtype) for t in graph.tasks]
    estimate, baseline, working = memory_estimate(graph, max_memory)
    read = sum({(i.model, i.name): i.nbytes for t in graph.tasks for i in t.inputs
                if i.model != GATES}.values())
    forward = moe_plan.base_bytes if recipe.gate_mode == "hidden" else 0
    return {
        "kind": "moe",
        "architecture": moe_plan.architecture,
        "base_model": recipe.base_model,
        "experts": [e.source_model for e in recipe.experts],
        "shared_experts": [e.source_model for e in recipe.shared_experts or []],
        "experts_per_token": recipe.experts_per_token,
        "gate_mode": recipe.gate_mode,
        "prompts": moe_plan.prompt_count,
        "layers": moe_plan.layers,
        "tensors": len(graph.tasks),
        "bytes_read": read,
        "bytes_written": graph.output_bytes,
        "shards": len(plan_shards(specs, max_shard_bytes)),
        "peak_memory_bytes": estimate,
        "baseline_bytes": baseline,
        "peak_working_bytes": working,
        "gate_pass_bytes": forward,
        "stochastic": moe_plan.stochastic,
    }


def format_moe_plan(moe_plan: MoePlan, *, max_shard_bytes: int | None, max_memory: int | None,
                    verbose: bool = False) -> str:
    """A few lines saying what ``fusekit moe`` would build, read, write and need."""
    s = moe_plan_summary(moe_plan, max_shard_bytes=max_shard_bytes, max_memory=max_memory)
    recipe = moe_plan.recipe
    lines = [f"moe: {s['architecture']}, {len(s['experts'])} experts per layer, "
             f"{s['experts_per_token']} per token, {s['layers']} layers; attention, norms, "
             f"embeddings and head from '{s['base_model']}'", "experts:"]
    for index, expert in enumerate(recipe.experts):
        lines.append(f"  {index}: {expert.source_model} ({len(expert.positive_prompts or [])} "
                     f"positive, {len(expert.negative_prompts or [])} negative prompts)")
    for expert in recipe.shared_experts or []:
        lines.append(f"  shared: {expert.source_model} (always on)")
    if recipe.gate_mode == "hidden":
        gates = (f"hidden: one forward pass of the base over {s['prompts']} prompts, loading about "
                 f"{human_bytes(s['gate_pass_bytes'])} of float32 weights before streaming starts")
    elif recipe.gate_mode == "cheap_embed":
        gates = f"cheap_embed: mean token embeddings of {s['prompts']} prompts (no forward pass)"
    else:
        gates = f"{recipe.gate_mode}: drawn from --random-seed"
    lines += [
        f"gates: {gates}",
        f"reads {human_bytes(s['bytes_read'])}, writes {s['tensors']} tensors, "
        f"{human_bytes(s['bytes_written'])} in {s['shards']} shard(s)",
        f"peak memory estimate while streaming: {human_bytes(s['peak_memory_bytes'])} (process "
        f"{human_bytes(s['baseline_bytes'])} + tensors in flight {human_bytes(s['peak_working_bytes'])})",
    ]
    if verbose:
        lines.append("tensors:")
        for task in moe_plan.graph.tasks:
            (source,) = task.inputs
            params = task.model_params[0].model_dump(exclude_none=True)
            details = " | " + ", ".join(f"{k}={v:g}" for k, v in params.items()) if params else ""
            lines.append(f"  {task.output} {list(task.shape)} "
                         f"{str(task.out_dtype).removeprefix('torch.')} <- {source.model}:"
                         f"{source.name}{details}")
    return "\n".join(lines)


def describe_moe_plan(recipe: str | Path, *, as_json: bool, verbose: bool, max_shard_bytes: int | None,
                      max_memory: int | None, allow_pickle: bool = False) -> str:
    """``fusekit plan`` output for an MoE recipe (identical experts are allowed here, as the
    ``fusekit moe`` flag may allow them)."""
    moe_plan = plan_moe(recipe, allow_pickle=allow_pickle, allow_identical_experts=True)
    if as_json:
        return json.dumps(moe_plan_summary(moe_plan, max_shard_bytes=max_shard_bytes,
                                           max_memory=max_memory), indent=2)
    return format_moe_plan(moe_plan, max_shard_bytes=max_shard_bytes, max_memory=max_memory,
                           verbose=verbose)
