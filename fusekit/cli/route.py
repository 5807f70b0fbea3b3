"""``fusekit route build|eval|calibrate|run``: learn which model answers each query, measure it, use it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.helptext import FusekitTyper
from fusekit.cli.options import (
    BatchSizeOpt,
    DataOpt,
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    JsonOpt,
    MaxNewTokensOpt,
    NoCacheOpt,
    OptionalDataOpt,
    OutOpt,
    OverwriteOpt,
    PlotOpt,
    PromptOpt,
    QuietOpt,
    ShareOpt,
    SharesOpt,
    ThresholdOpt,
    ThresholdsOpt,
    show_progress,
    wants_json,
)
from fusekit.errors import FusekitError

route_app = FusekitTyper(name="route", no_args_is_help=True, add_completion=False,
                         pretty_exceptions_enable=False,
                         help="Route each query to the model that should answer it.",
                         epilog="Example: fusekit route build configs/route/tfidf-knn.yaml ./router\n"
                                "fusekit route run ./router --prompt 'def main():' --json")
app.add_typer(route_app, name="route")

RouterArg = Annotated[Path, typer.Argument(help="Router folder written by fusekit route build.",
                                           show_default=False)]


def _require_fraction(option: str, value: float) -> None:
    if not 0 <= value <= 1:
        raise FusekitError(f"{option} {value}: must be between 0 and 1")


@route_app.command("build", epilog="Example: fusekit route build configs/route/tfidf-knn.yaml ./router")
def build(
    recipe: Annotated[Path, typer.Argument(help="YAML router recipe.", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Router folder to write (atomically).",
                                            show_default=False)],
    overwrite: OverwriteOpt = False,
    device: DeviceOpt = Device.cpu,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Label the recipe's data, fit features and router, calibrate the threshold, save OUT_DIR.

    Per-example scores are cached (keyed by each model's content, the text and the scoring
    settings), so building again on the same data skips the scoring; --no-cache scores afresh."""
    from fusekit.route import build_router

    show_progress(quiet)
    result = build_router(recipe, out_dir, overwrite=overwrite, device=device.value, use_cache=not no_cache)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(_build_summary(out_dir, result), indent=2))
        return
    if quiet:
        return
    from fusekit.route.arrow import Arrow

    router = result.router
    if isinstance(router, Arrow):
        typer.echo(f"built Arrow router (top {router.top_k}, temperature {router.router_temperature:g}) "
                   f"over the adapters {', '.join(router.names)} into {out_dir} in {result.seconds:.1f} s: "
                   "nothing to fit, PEFT computes each adapter's prototype when the router loads")
        return
    training = router.info.get("training", {})
    accuracy = training.get("heldout_accuracy")
    typer.echo(f"built {router.fitted.kind} router over {router.featurizer.kind} features for "
               f"{', '.join(router.names)} into {out_dir} in {result.seconds:.1f} s: "
               f"{training.get('examples')} training examples, threshold {router.threshold:.4f}"
               + (f", cross-validated accuracy {accuracy:.1%}" if accuracy is not None else ""))


def _build_summary(out_dir: Path, result: Any) -> dict[str, Any]:
    router = result.router
    if not hasattr(router, "fitted"):  # router: arrow
        return {"out_dir": str(out_dir), "models": router.names, "router": "arrow", **router.settings(),
                "seconds": result.seconds}
    training = router.info.get("training", {})
    return {"out_dir": str(out_dir), "models": router.names, "features": router.featurizer.kind,
            "router": router.fitted.kind, "threshold": router.threshold, "seconds": result.seconds,
            **{k: training[k] for k in ("examples", "label_counts", "folds", "heldout_accuracy",
                                         "heldout_bits_per_byte", "heldout_oracle_bits_per_byte")
               if k in training},
            "heldout_dear_share": router.info.get("calibration", {}).get("heldout_dear_share")}


@route_app.command("eval", epilog="Example: fusekit route eval ./router --data "
                                  "demo-out/experts/data/test.jsonl --plot curve.png")
def evaluate(
    router_dir: RouterArg,
    data: DataOpt,
    threshold: ThresholdsOpt = None,
    share: SharesOpt = None,
    merge: Annotated[bool, typer.Option("--merge/--no-merge", help="Compare with a uniform linear "
                                        "merge of the models that share tokenizer and "
                                        "architecture.")] = True,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = Device.cpu,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
    compare: Annotated[list[Path] | None, typer.Option(
        "--compare", help="Another router folder to measure on the same data and report beside this "
        "one (repeatable).", show_default=False)] = None,
) -> None:
    """Routed bits per byte against every single model, the oracle and a uniform merge; the
    cost-quality table across thresholds; calibration on this data.

    An Arrow router reports its own model's bits per byte (no thresholds). --compare adds other
    routers' bits per byte. --plot curve.png draws the cost-quality curve with each model and the
    oracle as points."""
    from fusekit.route import evaluate_router

    show_progress(quiet)
    for value in [*(threshold or []), *(share or [])]:
        _require_fraction("--threshold/--share", value)
    if plot is not None:  # refused before the models run, not after
        from fusekit.plots import check_plot_path
        from fusekit.route.router import is_arrow_router

        check_plot_path(plot)
        if is_arrow_router(router_dir):
            raise FusekitError(f"--plot draws the cost-quality curve across thresholds, and the Arrow "
                               f"router {router_dir} has none; leave --plot out")
    report = evaluate_router(router_dir, data, device=device.value, thresholds=threshold, shares=share,
                             with_merge=merge, batch_size=batch_size, use_cache=not no_cache,
                             compare=compare or [])
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(report.to_dict(), indent=2))
    else:
        typer.echo(report.format_text())
    if plot is not None:
        from fusekit.plots import plot_route_curve

        typer.echo(f"wrote the cost-quality curve to {plot_route_curve(report, plot)}", err=True)


@route_app.command("calibrate", epilog="Example: fusekit route calibrate ./router --data "
                                       "traffic.jsonl --share 0.3")
def calibrate(
    router_dir: RouterArg,
    data: DataOpt,
    share: ShareOpt,
    out_dir: OutOpt = None,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Set the threshold so that --share of the queries in --data go to dearer models.

    No model runs and no labels are needed; the calibrated router replaces ROUTER, or goes to --out."""
    from fusekit.route.calibration import recalibrate_router

    show_progress(quiet)
    _require_fraction("--share", share)
    router = recalibrate_router(router_dir, data, share, out_dir, overwrite=overwrite)
    calibration = router.info["calibration"]
    target = out_dir if out_dir is not None else router_dir
    if wants_json(output_format, as_json):
        typer.echo(json.dumps({"router": str(target), **calibration}, indent=2))
        return
    dearer = ", ".join(router.names[i] for i in router.dear_indices())
    typer.echo(f"calibrated {target}: threshold {router.threshold:.4f} sends {share:.1%} of the "
               f"{calibration['queries']} queries in {data} to {dearer}")


@route_app.command("run", epilog="Example: fusekit route run ./router --prompt \"def main():\" --generate")
def run(
    router_dir: RouterArg,
    prompt: PromptOpt = None,
    data: OptionalDataOpt = None,
    generate: Annotated[bool, typer.Option("--generate", help="Also let the chosen model answer "
                                           "(greedy).")] = False,
    max_new_tokens: MaxNewTokensOpt = 64,
    threshold: ThresholdOpt = None,
    device: DeviceOpt = Device.cpu,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Print the model the router picks for --prompt, or for each query of --data.

    With --generate the chosen model also answers; --data prints one JSON line per query."""
    from fusekit.route import run_router
    from fusekit.route.run import route_file

    show_progress(quiet)
    if threshold is not None:
        _require_fraction("--threshold", threshold)
    if generate and max_new_tokens < 1:
        raise FusekitError(f"--max-new-tokens {max_new_tokens}: must be at least 1 for --generate")
    if (prompt is None) == (data is None):
        raise FusekitError("give either --prompt TEXT or --data FILE (one query, or a JSONL file of them)")
    if data is not None:
        for record in route_file(router_dir, data, generate=generate, max_new_tokens=max_new_tokens,
                                 threshold=threshold, device=device.value):
            typer.echo(json.dumps(record, ensure_ascii=False))
        return
    assert prompt is not None
    if not prompt.strip():
        raise FusekitError("--prompt is empty; give the query to route")
    result = run_router(router_dir, prompt, generate=generate, max_new_tokens=max_new_tokens,
                        threshold=threshold, device=device.value)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(_run_record(result), indent=2))
        return
    decision = result.decision
    probs = ", ".join(f"{k} {v:.3f}" for k, v in decision.probabilities.items())
    what = "p" if decision.threshold is not None else "mean Arrow weights"
    typer.echo(f"{decision.model.name}\t{decision.model.ref}\t({what}: {probs})")
    if result.answer is not None:
        typer.echo(result.answer)


def _run_record(result: Any) -> dict[str, Any]:
    decision = result.decision
    return {"model": decision.model.name, "ref": decision.model.ref, "cost": decision.model.cost,
            "threshold": decision.threshold, "probabilities": decision.probabilities,
            "routing_ms": result.seconds_routing * 1000, "answer": result.answer}
