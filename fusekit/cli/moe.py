"""``fusekit moe``: upcycle dense models into a Mixtral / Qwen2-MoE / Qwen3-MoE / DeepSeek-MoE checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.options import (
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    JsonOpt,
    MaxMemoryOpt,
    OutDirArg,
    OverwriteOpt,
    PickleOpt,
    QuietOpt,
    RecipeArg,
    SeedOpt,
    ShardSizeOpt,
    show_progress,
    wants_json,
)
from fusekit.sizes import parse_size

IdenticalExpertsOpt = Annotated[bool, typer.Option(
    "--allow-identical-experts", "--i-understand-this-is-not-useful-without-training",
    help="Allow every expert to be the same model, with a warning (only useful if you train "
         "afterwards; mergekit-moe's flag name is accepted too).")]


@app.command(epilog="Example: fusekit moe configs/moe/mixtral-hidden.yaml ./moe --device auto")
def moe(
    recipe: RecipeArg,
    out_dir: OutDirArg,
    overwrite: OverwriteOpt = False,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    device: DeviceOpt = Device.cpu,
    random_seed: SeedOpt = None,
    allow_pickle: PickleOpt = False,
    allow_identical_experts: IdenticalExpertsOpt = False,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Build a mixture-of-experts model from dense experts (mergekit-moe recipes) into OUT_DIR.

    --device is where the base model runs for 'hidden' gates; copying runs on the CPU."""
    from fusekit.moe import run_moe

    result = run_moe(recipe, out_dir, overwrite=overwrite, out_shard_size=parse_size(out_shard_size),
                     max_memory=parse_size(max_memory, "--max-memory"), device=device.value,
                     random_seed=random_seed, allow_pickle=allow_pickle,
                     allow_identical_experts=allow_identical_experts, progress=show_progress(quiet))
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(_moe_summary(out_dir, result), indent=2))
    elif not quiet:
        _print_moe(out_dir, result)


def _moe_summary(out_dir: Path, result: Any) -> dict[str, Any]:
    stats, moe_plan = result.stats, result.moe_plan
    return {"out_dir": str(out_dir), "architecture": moe_plan.architecture,
            "experts": len(moe_plan.recipe.experts), "gate_mode": moe_plan.recipe.gate_mode,
            "tensors": stats.tensors, "bytes_written": stats.bytes_written, "shards": len(stats.files),
            "seconds": stats.seconds, "random_seed": result.seed, "peak_rss_bytes": stats.peak_rss_bytes}


def _print_moe(out_dir: Path, result: Any) -> None:
    from fusekit.plan.report import human_bytes

    stats, moe_plan = result.stats, result.moe_plan
    typer.echo(f"built a {moe_plan.architecture} MoE ({len(moe_plan.recipe.experts)} experts, "
               f"{moe_plan.recipe.gate_mode} gates) into {out_dir}: {stats.tensors} tensors, "
               f"{human_bytes(stats.bytes_written)} in {len(stats.files)} shard(s), "
               f"{stats.seconds:.1f} s, peak memory {human_bytes(stats.peak_rss_bytes)}")
