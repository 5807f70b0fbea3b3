"""``fusekit merge`` and ``fusekit plan``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.options import Device, Format, MaxMemoryOpt, PickleOpt, RecipeArg, ShardSizeOpt, parse_size


@app.command(epilog="Example: fusekit merge configs/linear.yaml ./merged --out-shard-size 2GB")
def merge(
    recipe: RecipeArg,
    out_dir: Annotated[Path, typer.Argument(help="Output folder; written atomically.",
                                            show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty "
                                            "output folder.")] = False,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    device: Annotated[Device, typer.Option("--device", help="Where the arithmetic runs.")] = Device.cpu,
    allow_pickle: PickleOpt = False,
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                                                 help="Copy the tokenizer files.")] = True,
    random_seed: Annotated[int | None, typer.Option("--random-seed", help="Seed for stochastic "
                                                    "methods; picked and recorded when absent.")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="Read, merge and write on one "
                                             "thread (same bytes, slower).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    output_format: Annotated[Format, typer.Option("--format", help="Summary as text or json.")] = Format.text,
) -> None:
    """Merge the models a recipe names into OUT_DIR, a transformers-loadable model."""
    from fusekit.merging import merge as run_merge
    from fusekit.plan.report import human_bytes

    result = run_merge(recipe, out_dir, overwrite=overwrite, out_shard_size=parse_size(out_shard_size),
                       device=device.value, allow_pickle=allow_pickle,
                       copy_tokenizer_files=copy_tokenizer, random_seed=random_seed,
                       max_memory=parse_size(max_memory, "--max-memory"), pipelined=not sequential,
                       progress=not quiet and sys.stderr.isatty() and not os.environ.get("CI"))
    stats = result.stats
    if output_format is Format.json:
        typer.echo(json.dumps({"out_dir": str(out_dir), "tensors": stats.tensors,
                               "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written,
                               "shards": len(stats.files), "seconds": stats.seconds,
                               "random_seed": result.seed,
                               "peak_rss_bytes": stats.peak_rss_bytes}, indent=2))
    elif not quiet:
        typer.echo(f"merged {stats.tensors} tensors ({result.plan.recipe.merge_method}, "
                   f"{len(result.plan.models)} models) into {out_dir}: "
                   f"{human_bytes(stats.bytes_written)} in {len(stats.files)} shard(s), "
                   f"{stats.seconds:.1f} s, peak memory {human_bytes(stats.peak_rss_bytes)}")


@app.command(epilog="Example: fusekit plan configs/linear.yaml --verbose")
def plan(
    recipe: RecipeArg,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="One line per tensor.")] = False,
    output_format: Annotated[Format, typer.Option("--format", help="text or json.")] = Format.text,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    allow_pickle: PickleOpt = False,
) -> None:
    """Dry run: check a recipe and show what would be read, computed and written (no tensor data
    is read)."""
    from fusekit.merging import plan as build
    from fusekit.plan.report import format_plan, plan_summary

    merge_plan = build(recipe, allow_pickle=allow_pickle)
    limits = {"max_shard_bytes": parse_size(out_shard_size),
              "max_memory": parse_size(max_memory, "--max-memory")}
    if output_format is Format.json:
        summary: dict[str, Any] = plan_summary(merge_plan, **limits)
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(format_plan(merge_plan, verbose=verbose, **limits))
