"""``fusekit merge`` and ``fusekit plan``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.options import (
    CommitMessageOpt,
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    JsonOpt,
    MaxMemoryOpt,
    OutDirArg,
    OverwriteOpt,
    PickleOpt,
    PrivateOpt,
    QuietOpt,
    RecipeArg,
    RevisionOpt,
    SeedOpt,
    ShardSizeOpt,
    show_progress,
    wants_json,
)
from fusekit.sizes import parse_size

# Options only `fusekit merge` takes; the shared ones live in fusekit.cli.options.
CopyTokenizerOpt = Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                                                help="Copy the tokenizer files.")]
SequentialOpt = Annotated[bool, typer.Option("--sequential", help="Read, merge and write on one "
                                             "thread (same bytes, slower).")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Recompute even when OUT_DIR's fusekit.lock "
                                        "says it is up to date (implies --overwrite).")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue an interrupted merge from its "
                                         "completed, hash-verified shards.")]
LockedOpt = Annotated[bool, typer.Option("--locked", help="Fail if any input differs from the lock "
                                         "file (reproducible CI).")]
LockFileOpt = Annotated[Path | None, typer.Option("--lock-file", help="Lock that --locked compares "
                                                  "with; default OUT_DIR/fusekit.lock.", show_default=False)]
NonFiniteOpt = Annotated[bool, typer.Option("--allow-nonfinite", help="Write NaN/Inf values "
                                            "instead of stopping with an error.")]
PushToHubOpt = Annotated[str | None, typer.Option("--push-to-hub", help="Upload the output to this "
                                                  "Hub repository (org/name) afterwards.",
                                                  show_default=False)]


@app.command(epilog="Example: fusekit merge configs/linear.yaml ./merged --out-shard-size 2GB "
                    "--push-to-hub my-org/my-merge")
def merge(
    recipe: RecipeArg,
    out_dir: OutDirArg,
    overwrite: OverwriteOpt = False,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    device: DeviceOpt = Device.cpu,
    allow_pickle: PickleOpt = False,
    copy_tokenizer: CopyTokenizerOpt = True,
    random_seed: SeedOpt = None,
    sequential: SequentialOpt = False,
    force: ForceOpt = False,
    resume: ResumeOpt = False,
    locked: LockedOpt = False,
    lock_file: LockFileOpt = None,
    allow_nonfinite: NonFiniteOpt = False,
    push_to_hub: PushToHubOpt = None,
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    commit_message: CommitMessageOpt = None,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Merge the models a recipe names into OUT_DIR, a transformers-loadable model."""
    from fusekit.merging import merge as run_merge

    if push_to_hub is not None:
        from fusekit.io.hub import check_repo_id, check_settings

        check_repo_id(push_to_hub)  # before the work, not after it
        check_settings()
    result = run_merge(recipe, out_dir, overwrite=overwrite, out_shard_size=parse_size(out_shard_size),
                       device=device.value, allow_pickle=allow_pickle,
                       copy_tokenizer_files=copy_tokenizer, random_seed=random_seed,
                       max_memory=parse_size(max_memory, "--max-memory"), pipelined=not sequential,
                       progress=show_progress(quiet), force=force, resume=resume, locked=locked,
                       lock_file=lock_file, allow_nonfinite=allow_nonfinite)
    pushed = None
    if push_to_hub is not None:
        from fusekit.io.hub import push_to_hub as push

        pushed = push(out_dir, push_to_hub, private=private, revision=revision,
                      commit_message=commit_message)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(_merge_summary(out_dir, result, pushed), indent=2))
    elif not quiet:
        _print_merge(out_dir, result, pushed)


def _merge_summary(out_dir: Path, result: Any, pushed: Any) -> dict[str, Any]:
    stats = result.stats
    return {"out_dir": str(out_dir), "up_to_date": result.up_to_date, "kept_shards": result.kept_shards,
            "tensors": stats.tensors, "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written,
            "shards": len(stats.files), "seconds": stats.seconds, "random_seed": result.seed,
            "peak_rss_bytes": stats.peak_rss_bytes, "commit_url": pushed.commit_url if pushed else None}


def _print_merge(out_dir: Path, result: Any, pushed: Any) -> None:
    from fusekit.plan.report import human_bytes

    stats = result.stats
    if result.up_to_date:
        typer.echo(f"{out_dir} is up to date (fusekit.lock matches the recipe and inputs); nothing to do")
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
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    allow_pickle: PickleOpt = False,
) -> None:
    """Dry run: check a recipe and show what would be read, computed and written (no tensor data
    is read)."""
    from fusekit.merging import plan_merge as build
    from fusekit.moe.recipe import is_moe_recipe
    from fusekit.plan.report import format_plan, plan_summary

    to_json = wants_json(output_format, as_json)
    limits = {"max_shard_bytes": parse_size(out_shard_size),
              "max_memory": parse_size(max_memory, "--max-memory")}
    if is_moe_recipe(recipe):  # has `experts`: what `fusekit moe` would build
        from fusekit.moe.report import describe_moe_plan

        typer.echo(describe_moe_plan(recipe, as_json=to_json, verbose=verbose, allow_pickle=allow_pickle,
                                     **limits))
        return
    merge_plan = build(recipe, allow_pickle=allow_pickle)
    if to_json:
        typer.echo(json.dumps(plan_summary(merge_plan, **limits), indent=2))
    else:
        typer.echo(format_plan(merge_plan, verbose=verbose, **limits))
