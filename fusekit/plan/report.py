"""Human and JSON descriptions of a plan, for ``fusekit plan``."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from fusekit.io.layout import TensorSpec, plan_shards
from fusekit.io.reader import CheckpointReader
from fusekit.io.refs import ResolvedModel
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


def adapter_summary(model: ResolvedModel) -> dict[str, Any] | None:
    """What a model's LoRA adapter changes (see :func:`fusekit.lora.layout.describe_adapter`), from
    headers alone; None for a model without one."""
    if model.adapter is None:
        return None
    from fusekit.lora.layout import describe_adapter

    with CheckpointReader(model) as reader:
        return describe_adapter(model, reader.infos)


def _adapter_line(adapter: dict[str, Any]) -> str:
    kind = "DoRA" if adapter["dora"] else "LoRA"
    ranks = "/".join(map(str, adapter["ranks"])) or "-"
    alphas = "/".join(f"{a:g}" for a in adapter["alphas"]) or "-"
    saved = ", ".join(adapter["modules_to_save"]) or "none"
    return (f"    adapter {adapter['adapter']} ({kind}{', rsLoRA' if adapter['rslora'] else ''}) on "
            f"'{adapter['base']}': rank {ranks}, alpha {alphas}, {adapter['modules']} module(s) "
            f"({', '.join(adapter['module_names'])}), modules_to_save: {saved}")


def plan_summary(plan: Plan, *, max_shard_bytes: int | None,
                 max_memory: int | None) -> dict[str, Any]:
    """Machine-readable summary: inputs, outputs, shards and the peak-memory estimate."""
    specs = [TensorSpec(t.output, t.shape, t.out_dtype) for t in plan.tasks]
    peak = plan.peak_task()
    estimate, baseline, working = memory_estimate(plan, max_memory)
    return {
        "merge_method": plan.recipe.merge_method,
        "models": {ref: {"folder": str(m.folder), "files": len(m.weight_files),
                         "revision": m.revision, "adapter": adapter_summary(m)}
                   for ref, m in plan.models.items()},
        "donor": plan.donor,
        "tensors": len(plan.tasks),
        "bytes_read": plan.input_bytes,
        "bytes_written": plan.output_bytes,
        "shards": len(plan_shards(specs, max_shard_bytes)),
        "config_layers": plan.out_config.get("num_hidden_layers"),
        "tokenizer_from": plan.tokenizer_source.ref if plan.tokenizer_source else None,
        "vocabulary": None if plan.vocab is None else {
            "source": plan.vocab.vocab.source, "tokens": plan.vocab.vocab.length, "rows": plan.vocab.size,
            "missing_tokens": plan.vocab.missing()},
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
        adapter = summary["models"][ref]["adapter"]
        if adapter is not None:
            lines.append(_adapter_line(adapter))
    lines += [
        f"reads {human_bytes(summary['bytes_read'])}, writes {summary['tensors']} tensors, "
        f"{human_bytes(summary['bytes_written'])} in {summary['shards']} shard(s)",
        f"peak memory estimate: {human_bytes(summary['peak_memory_bytes'])} (process "
        f"{human_bytes(summary['baseline_bytes'])} + tensors in flight "
        f"{human_bytes(summary['peak_working_bytes'])}; largest tensor task: "
        f"{summary['largest_task']})",
    ]
    vocab = summary["vocabulary"]
    if vocab is not None:
        missing = ", ".join(f"{ref} {count}" for ref, count in vocab["missing_tokens"].items())
        lines.append(f"vocabulary: {vocab['source']}, {vocab['tokens']} tokens in {vocab['rows']} rows; "
                     f"tokens each model lacks (rows filled): {missing}")
    if verbose:
        lines.append("tensors:")
        lines += [_task_line(task) for task in plan.tasks]
    return "\n".join(lines)
