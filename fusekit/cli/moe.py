"""``fusekit moe``: upcycle dense models into a Mixtral / Qwen2-MoE checkpoint."""

from __future__ import annotations

import json
import os
import sys
from typing import Annotated

import typer

from fusekit.cli.app import app
from fusekit.cli.options import (
    Device,
    Format,
    MaxMemoryOpt,
    OutDirArg,
    OverwriteOpt,
    PickleOpt,
    RecipeArg,
    ShardSizeOpt,
)
from fusekit.sizes import parse_size


@app.command(epilog="Example: fusekit moe configs/moe/mixtral-hidden.yaml ./moe --device auto")
def moe(
    recipe: RecipeArg,
    out_dir: OutDirArg,
    overwrite: OverwriteOpt = False,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    device: Annotated[Device, typer.Option("--device", help="Where the base model runs for "
                                           "'hidden' gates.")] = Device.cpu,
    random_seed: Annotated[int | None, typer.Option("--random-seed", help="Seed for random gates "
                                                    "and expert noise; picked and recorded when "
                                                    "absent.")] = None,
    allow_pickle: PickleOpt = False,
    allow_identical_experts: Annotated[bool, typer.Option(
        "--allow-identical-experts", "--i-understand-this-is-not-useful-without-training",
        help="Allow every expert to be the same model (only useful if you train afterwards).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    output_format: Annotated[Format, typer.Option("--format", help="Summary as text or json.")] = Format.text,
) -> None:
    """Build a mixture-of-experts model from dense experts (mergekit-moe recipes) into OUT_DIR."""
    from fusekit.moe import run_moe
    from fusekit.plan.report import human_bytes

    result = run_moe(recipe, out_dir, overwrite=overwrite, out_shard_size=parse_size(out_shard_size),
                     max_memory=parse_size(max_memory, "--max-memory"), device=device.value,
                     random_seed=random_seed, allow_pickle=allow_pickle,
                     allow_identical_experts=allow_identical_experts,
                     progress=not quiet and sys.stderr.isatty() and not os.environ.get("CI"))
    stats, moe_plan = result.stats, result.moe_plan
    if output_format is Format.json:
        typer.echo(json.dumps({"out_dir": str(out_dir), "architecture": moe_plan.architecture,
                               "experts": len(moe_plan.recipe.experts),
                               "gate_mode": moe_plan.recipe.gate_mode, "tensors": stats.tensors,
                               "bytes_written": stats.bytes_written, "shards": len(stats.files),
                               "seconds": stats.seconds, "random_seed": result.seed,
                               "peak_rss_bytes": stats.peak_rss_bytes}, indent=2))
    elif not quiet:
        typer.echo(f"built a {moe_plan.architecture} MoE ({len(moe_plan.recipe.experts)} experts, "
                   f"{moe_plan.recipe.gate_mode} gates) into {out_dir}: {stats.tensors} tensors, "
                   f"{human_bytes(stats.bytes_written)} in {len(stats.files)} shard(s), "
                   f"{stats.seconds:.1f} s, peak memory {human_bytes(stats.peak_rss_bytes)}")
