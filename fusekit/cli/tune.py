"""``fusekit tune``: search a recipe's coefficients against text, on this machine or on Ray."""

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
    OverwriteOpt,
    QuietOpt,
    RecipeArg,
    show_progress,
    wants_json,
)

TuneOutArg = Annotated[Path, typer.Argument(
    help="Output folder: candidates, checkpoints, reports; best.yaml is written last, when the search "
    "is done.",
    show_default=False)]
WorkersOpt = Annotated[int | None, typer.Option(
    "--workers", min=1, help="Candidates evaluated at once (default: the recipe's tune.workers); above 1, "
    "a local Ray instance runs them (the 'tune' extra).", show_default=False)]
RayAddressOpt = Annotated[str | None, typer.Option(
    "--ray-address", help="Join a running Ray cluster instead: auto, HOST:PORT (its GCS port) or "
    "ray://HOST:PORT; every worker reads the models by path or from its Hub cache.", show_default=False,
    metavar="ADDRESS")]
TuneResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue the search checkpointed in "
                                             "OUT_DIR (after a crash or kill); same result as one run.")]
TuneMaxMemoryOpt = Annotated[str | None, typer.Option(
    "--max-memory", help="Memory a candidate may take when merged in memory, e.g. 4GB; larger candidates "
    "go through a temporary folder (default: half the memory available).", show_default=False,
    metavar="SIZE")]


@app.command(epilog="Example: fusekit tune configs/tune/merge-cma.yaml ./tuned --workers 2 && "
                    "fusekit merge ./tuned/best.yaml ./merged")
def tune(
    recipe: RecipeArg,
    out_dir: TuneOutArg,
    device: DeviceOpt = Device.cpu,
    workers: WorkersOpt = None,
    ray_address: RayAddressOpt = None,
    resume: TuneResumeOpt = False,
    overwrite: OverwriteOpt = False,
    max_memory: TuneMaxMemoryOpt = None,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Search the coefficients of a RECIPE whose values may be search spaces ({search: [0, 1]}), scored
    in bits per byte on its tune: data; write every candidate, checkpoints, progress.png, report.md
    and best.yaml (a plain recipe that fusekit merge reproduces) into OUT_DIR.

    An ensemble recipe with a tune: block gets its member weights learned on the data."""
    from fusekit.sizes import parse_size
    from fusekit.tune.search import tune as run_tune

    memory = parse_size(max_memory, "--max-memory") if max_memory is not None else None
    result = run_tune(recipe, out_dir, device=device.value, workers=workers, address=ray_address,
                      resume=resume, overwrite=overwrite, max_memory=memory, progress=show_progress(quiet))
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(result.report, indent=2))
    elif not quiet:
        _print_report(result.report, str(out_dir))


def _print_report(report: dict[str, Any], out_dir: str) -> None:
    from fusekit.progress import label

    on = report["scored_on"]
    typer.echo(f"{report['evaluations']} candidates ({report['optimizer']}); best: candidate "
               f"{report['best']['index']}, {report['best']['score']:.4f} bits/byte on the data")
    names = [label(r["name"]) if r["kind"] in ("single", "base") else r["name"] for r in report["rows"]]
    width = max(len("model"), *(len(name) for name in names))
    typer.echo(f"{'model':<{width}}  {'data':>8}  {on:>8}")
    for name, row in zip(names, report["rows"], strict=True):
        data = "" if row["data_bpb"] is None else f"{row['data_bpb']:.4f}"
        test = "" if row["test_bpb"] is None else f"{row['test_bpb']:.4f}"
        typer.echo(f"{name:<{width}}  {data:>8}  {test:>8}")
    typer.echo(f"wrote {out_dir}/best.yaml, report.md, report.json, candidates.jsonl")
