"""What ``fusekit merge`` and ``fusekit plan`` add for multi-stage recipes: the options, the stage
lines of a merge's report, and the stage graph with each stage's plan."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated, Any

import typer

StageOpt = Annotated[str | None, typer.Option(
    "--stage", help="Of a multi-stage recipe, build only this stage (and the stages it uses, when they "
    "are missing or out of date).", show_default=False)]
StagesDirOpt = Annotated[Path | None, typer.Option(
    "--stages-dir", "--intermediate-dir", help="Where a multi-stage recipe's earlier stages go "
    "(default: OUT_DIR.stages beside OUT_DIR; the last stage is OUT_DIR).", show_default=False)]
PlanOutDirOpt = Annotated[Path | None, typer.Option(
    "--out-dir", help="Of a multi-stage recipe: the OUT_DIR `fusekit merge` writes, so that stages "
    "using earlier stages built there are planned too.", show_default=False)]


def merge_function(run_merge: Callable[..., Any], stage: str | None,
                   stages_dir: Path | None) -> Callable[..., Any]:
    """``run_merge`` (:func:`fusekit.merge`), or the stage runner when ``--stage`` or
    ``--stages-dir`` is given."""
    if stage is None and stages_dir is None:
        return run_merge
    from fusekit.merging_stages import merge_stages

    return partial(merge_stages, stage=stage, stages_dir=stages_dir)


def stage_rows(result: Any) -> list[dict[str, Any]]:
    """One JSON row per stage of a multi-stage merge (none for a one-stage recipe)."""
    return [{"stage": name, "out_dir": str(each.out_dir), "up_to_date": each.up_to_date,
             "tensors": each.stats.tensors, "seconds": each.stats.seconds, "random_seed": each.seed}
            for name, each in result.stages]


def stage_lines(result: Any) -> list[str]:
    """One line per stage of a multi-stage merge, before the usual report of the last one."""
    lines = []
    for number, (name, each) in enumerate(result.stages, 1):
        stats = each.stats
        done = "up to date" if each.up_to_date else f"merged {stats.tensors} tensors in {stats.seconds:.1f} s"
        lines.append(f"stage {number}/{len(result.stages)} {name}: {done} → {each.out_dir}")
    return lines


def describe_stage_plans(recipe: Path, *, out_dir: Path | None, as_json: bool, verbose: bool,
                         limits: dict[str, Any], **options: Any) -> str:
    """The stage graph, then each stage's plan (text or JSON) — ``fusekit plan`` of a multi-stage file."""
    from fusekit.merging_stages import plan_stages
    from fusekit.plan.report import format_plan, plan_summary

    stages, plans = plan_stages(recipe, out_dir=out_dir, **options)
    if as_json:
        rows = [{**row, "out_dir": str(p.folder) if p.folder else None, "not_built": list(p.missing),
                 "plan": plan_summary(p.plan, **limits) if p.plan else None}
                for row, p in zip(stages.graph(), plans, strict=True)]
        return json.dumps({"stages": rows}, indent=2)
    parts = [stages.describe()]
    for number, each in enumerate(plans, 1):
        parts.append(f"\n== stage {number}: {each.stage.label} (line {each.stage.line}) ==")
        if each.plan is not None:
            parts.append(format_plan(each.plan, verbose=verbose, **limits))
            continue
        need = ", ".join(each.missing)
        hint = (f"build it with `fusekit merge {recipe} {out_dir} --stage {each.missing[-1]}`" if out_dir
                else "pass --out-dir OUT_DIR to plan it from the stages `fusekit merge` built there")
        parts.append(f"not planned: it uses stage {need}, not built yet; {hint}")
    return "\n".join(parts)
