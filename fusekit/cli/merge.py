"""``fusekit merge`` and ``fusekit plan``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.options import (
    CommitMessageOpt,
    Device,
    Format,
    MaxMemoryOpt,
    OutDirArg,
    OverwriteOpt,
    PickleOpt,
    PrivateOpt,
    RecipeArg,
    RevisionOpt,
    ShardSizeOpt,
)
from fusekit.sizes import parse_size


@app.command(epilog="Example: fusekit merge configs/linear.yaml ./merged --out-shard-size 2GB "
                    "--push-to-hub my-org/my-merge")
def merge(
    recipe: RecipeArg,
    out_dir: OutDirArg,
    overwrite: OverwriteOpt = False,
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
    force: Annotated[bool, typer.Option("--force", help="Recompute even when OUT_DIR's fusekit.lock "
                                        "says it is up to date (implies --overwrite).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue an interrupted merge from its "
                                         "completed, hash-verified shards.")] = False,
    locked: Annotated[bool, typer.Option("--locked", help="Fail if any input differs from the lock "
                                         "file (reproducible CI).")] = False,
    lock_file: Annotated[Path | None, typer.Option("--lock-file", help="Lock that --locked compares "
                                                   "with; default OUT_DIR/fusekit.lock.",
                                                   show_default=False)] = None,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help="Write NaN/Inf values "
                                                  "instead of stopping with an error.")] = False,
    push_to_hub: Annotated[str | None, typer.Option("--push-to-hub", help="Upload the output to this "
                                                    "Hub repository (org/name) afterwards.",
                                                    show_default=False)] = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    commit_message: CommitMessageOpt = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    output_format: Annotated[Format, typer.Option("--format", help="Summary as text or json.")] = Format.text,
) -> None:
    """Merge the models a recipe names into OUT_DIR, a transformers-loadable model."""
    from fusekit.merging import merge as run_merge
    from fusekit.plan.report import human_bytes

    if push_to_hub is not None:
        from fusekit.io.hub import check_repo_id

        check_repo_id(push_to_hub)  # before the work, not after it
    result = run_merge(recipe, out_dir, overwrite=overwrite, out_shard_size=parse_size(out_shard_size),
                       device=device.value, allow_pickle=allow_pickle,
                       copy_tokenizer_files=copy_tokenizer, random_seed=random_seed,
                       max_memory=parse_size(max_memory, "--max-memory"), pipelined=not sequential,
                       progress=not quiet and sys.stderr.isatty() and not os.environ.get("CI"),
                       force=force, resume=resume, locked=locked, lock_file=lock_file,
                       allow_nonfinite=allow_nonfinite)
    pushed = None
    if push_to_hub is not None:
        from fusekit.io.hub import push_to_hub as push

        pushed = push(out_dir, push_to_hub, private=private, revision=revision,
                      commit_message=commit_message)
    stats = result.stats
    if output_format is Format.json:
        typer.echo(json.dumps({"out_dir": str(out_dir), "up_to_date": result.up_to_date,
                               "kept_shards": result.kept_shards, "tensors": stats.tensors,
                               "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written,
                               "shards": len(stats.files), "seconds": stats.seconds,
                               "random_seed": result.seed,
                               "peak_rss_bytes": stats.peak_rss_bytes,
                               "commit_url": pushed.commit_url if pushed else None}, indent=2))
    elif not quiet:
        if result.up_to_date:
            typer.echo(f"{out_dir} is up to date (fusekit.lock matches the recipe and inputs); "
                       "nothing to do")
        else:
            typer.echo(f"merged {stats.tensors} tensors ({result.plan.recipe.merge_method}, "
                       f"{len(result.plan.models)} models) into {out_dir}: "
                       f"{human_bytes(stats.bytes_written)} in {len(stats.files)} shard(s), "
                       f"{stats.seconds:.1f} s, peak memory {human_bytes(stats.peak_rss_bytes)}")
        if pushed is not None:
            typer.echo(f"pushed {pushed.files} files to {pushed.repo_id}@{pushed.revision}: "
                       f"{pushed.commit_url}")


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
    from fusekit.merging import plan_merge as build
    from fusekit.moe.recipe import is_moe_recipe
    from fusekit.plan.report import format_plan, plan_summary

    if is_moe_recipe(recipe):  # has `experts`: what `fusekit moe` would build
        from fusekit.moe.report import describe_moe_plan

        typer.echo(describe_moe_plan(recipe, as_json=output_format is Format.json, verbose=verbose,
                                     max_shard_bytes=parse_size(out_shard_size),
                                     max_memory=parse_size(max_memory, "--max-memory"),
                                     allow_pickle=allow_pickle))
        return
    merge_plan = build(recipe, allow_pickle=allow_pickle)
    limits = {"max_shard_bytes": parse_size(out_shard_size),
              "max_memory": parse_size(max_memory, "--max-memory")}
    if output_format is Format.json:
        summary: dict[str, Any] = plan_summary(merge_plan, **limits)
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(format_plan(merge_plan, verbose=verbose, **limits))
