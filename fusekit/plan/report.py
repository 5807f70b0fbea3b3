"""Human and JSON descriptions of a plan, for ``fusekit plan``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fusekit.io.layout import TensorSpec, plan_shards
from fusekit.plan.graph import Plan, TensorTask
from fusekit.plan.memory import memory_estimate


def human_bytes(count: float) -> str:
    """``1536`` → ``1.5 KiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def _params_text(params: BaseModel) -> str:
    values = params.model_dump(by_alias=True, exclude_defaults=False)
    return ", ".join(f"{k}={v}" for k, v in values.items())


def _task_line(task: TensorTask) -> str:
    sources = ", ".join(f"{i.model}:{i.name}" for i in task.inputs)
    base = f" base={task.base.model}" if task.base else ""
    per_model = "; ".join(_params_text(p) for p in task.model_params if _params_text(p))
    params = _params_text(task.params)
    details = " | ".join(x for x in (per_model, params) if x)
    return (f"  {task.output} {list(task.shape)} {str(task.out_dtype).removeprefix('torch.')} "
            f"t={task.t:.3g} <- {sources}{base}" + (f" | {details}" if details else ""))


def plan_summary(plan: Plan, *, max_shard_bytes: int | None,
                 max_memory: int | None) -> dict[str, Any]:
    """Machine-readable summary: inputs, outputs, shards and the peak-memory estimate."""
    specs = [TensorSpec(t.output, t.shape, t.out_dtype) for t in plan.tasks]
    peak = plan.peak_task()
    estimate, baseline, working = memory_estimate(plan, max_memory)
    return {
        "merge_method": plan.recipe.merge_method,
        "models": {ref: {"folder": str(m.folder), "files": len(m.weight_files),
                         "revision": m.revision} for ref, m in plan.models.items()},
        "donor": plan.donor,
        "tensors": len(plan.tasks),
        "bytes_read": plan.input_bytes,
        "bytes_written": plan.output_bytes,
        "shards": len(plan_shards(specs, max_shard_bytes)),
        "config_layers": plan.out_config.get("num_hidden_layers"),
        "tokenizer_from": plan.tokenizer_source.ref if plan.tokenizer_source else None,
        "peak_memory_bytes": estimate,
        "baseline_bytes": baseline,
        "peak_working_bytes": working,
        "largest_task": peak.output if peak else None,
    }


def format_plan(plan: Plan, *, max_shard_bytes: int | None, max_memory: int | None,
                verbose: bool = False) -> str:
    """A few lines saying what would be read, computed and written, and the memory it needs."""
    summary = plan_summary(plan, max_shard_bytes=max_shard_bytes, max_memory=max_memory)
    lines = [f"merge method: {summary['merge_method']}  (config and generation settings from "
             f"'{plan.donor}', tokenizer from '{summary['tokenizer_from']}')", "models:"]
    for ref, model in plan.models.items():
        hub = f" @ {model.revision}" if model.revision else ""
        lines.append(f"  {ref}{hub}: {model.folder} ({len(model.weight_files)} file(s))")
    lines += [
        f"reads {human_bytes(summary['bytes_read'])}, writes {summary['tensors']} tensors, "
        f"{human_bytes(summary['bytes_written'])} in {summary['shards']} shard(s)",
        f"peak memory estimate: {human_bytes(summary['peak_memory_bytes'])} (process "
        f"{human_bytes(summary['baseline_bytes'])} + tensors in flight "
        f"{human_bytes(summary['peak_working_bytes'])}; largest tensor task: "
        f"{summary['largest_task']})",
    ]
    if verbose:
        lines.append("tensors:")
        lines += [_task_line(task) for task in plan.tasks]
    return "\n".join(lines)
