"""``fusekit merge`` and ``fusekit plan``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.mergekit_flags import (
    AllowCrimesOpt,
    CloneTensorsOpt,
    CudaOpt,
    LazyUnpickleOpt,
    LoraMergeCacheOpt,
    LowCpuMemoryOpt,
    TrustRemoteCodeOpt,
    WriteModelCardOpt,
    cuda_device,
    note_needless,
)
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
    StrictOpt,
    show_progress,
    wants_json,
)
from fusekit.cli.stages import PlanOutDirOpt, StageOpt, StagesDirOpt, merge_function, stage_lines, stage_rows
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
                                         "file, and reuse its random seed (reproducible CI).")]
LockFileOpt = Annotated[Path | None, typer.Option("--lock-file", help="Lock whose seed the merge reuses "
                                                  "and that --locked compares with; default "
                                                  "OUT_DIR/fusekit.lock.", show_default=False)]
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
    strict: StrictOpt = False,
    cuda: CudaOpt = False,
    allow_crimes: AllowCrimesOpt = False,
    lazy_unpickle: LazyUnpickleOpt = False,
    trust_remote_code: TrustRemoteCodeOpt = False,
    lora_merge_cache: LoraMergeCacheOpt = None,
    write_model_card: WriteModelCardOpt = None,
    low_cpu_memory: LowCpuMemoryOpt = False,
    clone_tensors: CloneTensorsOpt = False,
    stage: StageOpt = None,
    stages_dir: StagesDirOpt = None,
) -> None:
    """Merge the models a recipe names into OUT_DIR, a transformers-loadable model (a multi-stage
    recipe: every stage in order, the last into OUT_DIR)."""
    from fusekit.merging import merge as run_merge

    device = cuda_device(device, cuda)
    _check_push(push_to_hub)
    note_needless(lazy_unpickle=lazy_unpickle, trust_remote_code=trust_remote_code,
                  clone_tensors=clone_tensors, lora_merge_cache=lora_merge_cache,
                  low_cpu_memory=low_cpu_memory, write_model_card=write_model_card is not None)
    run = merge_function(run_merge, stage, stages_dir)
    result = run(recipe, out_dir, overwrite=overwrite, out_shard_size=parse_size(out_shard_size),
                       device=device.value, allow_pickle=allow_pickle,
                       copy_tokenizer_files=copy_tokenizer, random_seed=random_seed,
                       max_memory=parse_size(max_memory, "--max-memory"), pipelined=not sequential,
                       progress=show_progress(quiet), force=force, resume=resume, locked=locked,
                       lock_file=lock_file, allow_nonfinite=allow_nonfinite, allow_crimes=allow_crimes,
                       strict=strict)
    pushed = _push(result.out_dir, push_to_hub, private=private, revision=revision,
                   commit_message=commit_message)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(_merge_summary(out_dir, result, pushed), indent=2))
    elif not quiet:
        _print_merge(out_dir, result, pushed)


def _push(folder: Path, push_to_hub: str | None, **options: Any) -> Any:
    """Upload ``folder`` when --push-to-hub was given; the push result, or None."""
    if push_to_hub is None:
        return None
    from fusekit.io.hub import push_to_hub as push

    return push(folder, push_to_hub, **options)


def _check_push(push_to_hub: str | None) -> None:
    """Refuse a bad --push-to-hub target before the work, not after it."""
    if push_to_hub is not None:
        from fusekit.io.hub import check_repo_id, check_settings

        check_repo_id(push_to_hub)
        check_settings()


def _merge_summary(out_dir: Path, result: Any, pushed: Any) -> dict[str, Any]:
    stats = result.stats
    return {"out_dir": str(result.out_dir), "up_to_date": result.up_to_date,
            "kept_shards": result.kept_shards,
            "tensors": stats.tensors, "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written,
            "shards": len(stats.files), "seconds": stats.seconds, "random_seed": result.seed,
            "peak_rss_bytes": stats.peak_rss_bytes, "commit_url": pushed.commit_url if pushed else None,
            "stages": stage_rows(result)}


def _print_merge(out_dir: Path, result: Any, pushed: Any) -> None:
    from fusekit.plan.report import human_bytes

    stats, out_dir = result.stats, result.out_dir  # with --stage, the stage built
    for line in stage_lines(result):
        typer.echo(line)
    if result.up_to_date:
        typer.echo(f"{out_dir} is up to date (fusekit.lock matches the recipe and inputs); nothing to do")
    else:
        typer.echo(f"merged {stats.tensors} tensors ({result.plan.recipe.merge_method}, "
                   f"{len(result.plan.models)} models) into {out_dir}: "
                   f"{human_bytes(stats.bytes_written)} in {len(stats.files)} shard(s), "
                   f"{stats.seconds:.1f} s, peak memory {human_bytes(stats.peak_rss_bytes)}")
    if pushed is not None:
        from fusekit.cli.hub import push_line

        typer.echo(push_line(pushed))


@app.command(epilog="Example: fusekit plan configs/linear.yaml --verbose")
def plan(
    recipe: RecipeArg,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="One line per tensor.")] = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    allow_pickle: PickleOpt = False,
    strict: StrictOpt = False,
    allow_crimes: AllowCrimesOpt = False,
    out_dir: PlanOutDirOpt = None,
    quiet: QuietOpt = False,
) -> None:
    """Dry run: check a recipe and show what would be read, computed and written (no tensor data
    is read); a multi-stage recipe: its stage graph, then each stage's plan."""
    from fusekit.cli.stages import describe_stage_plans
    from fusekit.merging import plan_merge as build
    from fusekit.moe.recipe import is_moe_recipe
    from fusekit.plan.report import format_plan, plan_summary
    from fusekit.recipe.stages import is_multistage

    show_progress(quiet)
    to_json = wants_json(output_format, as_json)
    limits = {"max_shard_bytes": parse_size(out_shard_size),
              "max_memory": parse_size(max_memory, "--max-memory")}
    if is_multistage(recipe):
        typer.echo(describe_stage_plans(recipe, out_dir=out_dir, as_json=to_json, verbose=verbose,
                                        limits=limits, allow_pickle=allow_pickle, allow_crimes=allow_crimes,
                                        strict=strict))
        return
    if is_moe_recipe(recipe):  # has `experts`: what `fusekit moe` would build
        from fusekit.moe.report import describe_moe_plan

        typer.echo(describe_moe_plan(recipe, as_json=to_json, verbose=verbose, allow_pickle=allow_pickle,
                                     **limits))
        return
    merge_plan = build(recipe, allow_pickle=allow_pickle, allow_crimes=allow_crimes, strict=strict)
    if to_json:
        typer.echo(json.dumps(plan_summary(merge_plan, **limits), indent=2))
    else:
        typer.echo(format_plan(merge_plan, verbose=verbose, **limits))
