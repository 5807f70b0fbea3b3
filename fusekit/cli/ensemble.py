"""``fusekit ensemble generate | score | check``."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.helptext import FusekitTyper
from fusekit.cli.options import (
    BatchSizeOpt,
    ContextOpt,
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    JsonOpt,
    NoCacheOpt,
    OutOpt,
    PlotOpt,
    PromptsOpt,
    QuietOpt,
    RecipeArg,
    RecipeMaxNewTokensOpt,
    SeedOpt,
    TextOpt,
    ThreadsOpt,
    set_threads,
    show_progress,
    wants_json,
)
from fusekit.errors import FusekitError

ensemble_app = FusekitTyper(name="ensemble", no_args_is_help=True, add_completion=False,
                            help="Combine models token by token, cascade them, or let them vote.",
                            epilog="Example: fusekit ensemble check configs/ensemble/union.yaml\n"
                                   "fusekit ensemble score configs/ensemble/union.yaml --text FILE --json")
app.add_typer(ensemble_app, name="ensemble")

PromptFileOpt = Annotated[Path | None, typer.Option("--prompts", help="JSON lines file, one "
                                                    "{\"prompt\": ...} per line.", show_default=False)]
TemperatureOpt = Annotated[float | None, typer.Option("--temperature", help="0 is greedy; default: the "
                                                      "recipe's.", show_default=False)]


@ensemble_app.command(epilog="Example: fusekit ensemble generate configs/ensemble/prob_avg.yaml "
                             "--prompt 'def fib(' --max-new-tokens 32")
def generate(
    recipe: RecipeArg,
    prompt: PromptsOpt = None,
    prompts: PromptFileOpt = None,
    out: OutOpt = None,
    max_new_tokens: RecipeMaxNewTokensOpt = None,
    temperature: TemperatureOpt = None,
    seed: SeedOpt = None,
    batch_size: BatchSizeOpt = 8,
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Continue each prompt with the ensemble the RECIPE describes.

    Answers go to stdout, or as JSON lines to --out."""
    from fusekit.ensemble.engine import load_ensemble
    from fusekit.ensemble.io import read_prompts, write_answers
    from fusekit.io.outputs import check_out_file

    show_progress(quiet)
    if out is not None:  # refused before any model loads, not after decoding
        check_out_file(out, inputs=[("the prompts file", prompts)] if prompts else [])
    texts = list(prompt or [])
    if prompts is not None:
        texts += read_prompts(prompts)
    if not texts:
        raise FusekitError("give --prompt TEXT or --prompts FILE")
    set_threads(threads)
    ens = load_ensemble(recipe, device=device.value)
    result = ens.generate(texts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                          batch_size=batch_size)
    summary, to_json = result.summary(), wants_json(output_format, as_json)
    if out is not None:
        write_answers(out, result.answers)
        typer.echo(f"wrote {len(result.answers)} answers to {out}", err=True)
    elif to_json:
        typer.echo(json.dumps({"answers": [_answer(a) for a in result.answers], "stats": summary}, indent=2))
    else:
        for answer in result.answers:
            typer.echo(answer.prompt + answer.text)
    if (not to_json or out is not None) and not quiet:
        typer.echo("fusekit: " + ", ".join(f"{k} {v}" for k, v in summary.items()), err=True)


def _answer(answer: Any) -> dict[str, Any]:
    from fusekit.ensemble.io import answer_record

    return answer_record(answer)


@ensemble_app.command(epilog="Example: fusekit ensemble score configs/ensemble/prob_avg.yaml "
                             "--text demo-out/experts/heldout/mixed.txt")
def score(
    recipe: RecipeArg,
    text: TextOpt,
    context: ContextOpt = None,
    device: DeviceOpt = Device.cpu,
    threads: ThreadsOpt = None,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
    plot: PlotOpt = None,
) -> None:
    """Bits per byte and perplexity of a text under the ensemble and under each member alone.

    --plot bars.png draws them as a bar chart."""
    from fusekit.ensemble.engine import load_ensemble
    from fusekit.ensemble.scoring import score_ensemble
    from fusekit.lm.score import read_text_file

    show_progress(quiet)
    if plot is not None:  # refused before the models run, not after
        from fusekit.plots import check_plot_path

        check_plot_path(plot)
    content = read_text_file(text)
    set_threads(threads)
    ens = load_ensemble(recipe, device=device.value)
    result = score_ensemble(ens, content, context=context)
    rows = [{"name": f"ensemble ({ens.method})", **_score(result.ensemble)}]
    rows += [{"name": m.ref, **_score(s)} for m, s in zip(ens.members, result.members, strict=True)]
    if plot is not None:
        from fusekit.plots import plot_ensemble_bars

        typer.echo(f"wrote the bar chart to {plot_ensemble_bars(rows, plot)}", err=True)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps({"text": str(text), "bytes": result.ensemble.n_bytes, "rows": rows,
                               "details": result.details}, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    typer.echo(f"{'':{width}}  bits/byte  perplexity  tokens")
    for r in rows:
        typer.echo(f"{r['name']:{width}}  {r['bits_per_byte']:9.4f}  {r['perplexity']:10.3f}  "
                   f"{r['tokens']:6d}")
    if result.details and not quiet:
        typer.echo("fusekit: " + ", ".join(f"{k} {v}" for k, v in result.details.items()), err=True)


def _score(s: Any) -> dict[str, Any]:
    return {"bits_per_byte": s.bits_per_byte, "perplexity": s.perplexity, "tokens": s.n_tokens,
            "nll_nats": s.nll_nats}


LearnDataOpt = Annotated[Path, typer.Option("--data", help="JSONL file of {\"text\": ...} rows, or a plain "
                                            "UTF-8 text file, to fit the weights on.", show_default=False,
                                            metavar="FILE")]
LearnOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Recipe to write (default: RECIPE's "
                                                  "name + .learned.yaml beside it).", show_default=False)]


@ensemble_app.command("learn-weights", epilog="Example: fusekit ensemble learn-weights "
                      "configs/ensemble/prob_avg.yaml --data demo-out/experts/data/train.jsonl")
def learn_weights(
    recipe: RecipeArg,
    data: LearnDataOpt,
    out: LearnOutOpt = None,
    device: DeviceOpt = Device.cpu,
    batch_size: BatchSizeOpt = 8,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Fit the member weights of a prob_avg RECIPE to --data (lowest bits per byte over the weight
    simplex, from per-token log-probabilities cached per member) and write the recipe with them.

    Prints each member's weight and the bits per byte before and after."""
    from fusekit.io.outputs import check_out_file
    from fusekit.select.data import read_data_texts
    from fusekit.select.learned import learn_recipe_weights
    from fusekit.select.recipes import write_recipe

    show_progress(quiet)
    target = check_out_file(out or recipe.with_name(f"{recipe.stem}.learned.yaml"), option="--out",
                            inputs=[("data file", data)] + ([] if out is not None else [("recipe", recipe)]))
    result = learn_recipe_weights(recipe, read_data_texts(data), device=device.value, use_cache=not no_cache,
                                  batch_size=batch_size)
    write_recipe(target, result.recipe_text)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps({**result.to_json(), "recipe": str(target)}, indent=2))
        return
    width = max(len(r) for r in result.refs)
    typer.echo(f"{'member':<{width}}  before   after")
    for ref, before, after in zip(result.refs, result.before, result.after, strict=True):
        typer.echo(f"{ref:<{width}}  {before:.4f}  {after:.4f}" + ("  (left out)" if after == 0 else ""))
    typer.echo(f"bits per byte on {data}: {result.before_bpb:.4f} before, {result.after_bpb:.4f} after")
    typer.echo(f"wrote {target}")


@ensemble_app.command(epilog="Example: fusekit ensemble check configs/ensemble/union.yaml")
def check(recipe: RecipeArg, output_format: FormatOpt = Format.text, as_json: JsonOpt = False,
          quiet: QuietOpt = False) -> None:
    """Compatibility report before spending: vocabulary overlap, tokenizer families, special tokens,
    alignment-table memory and cost per token (reads no weights)."""
    from fusekit.ensemble.check import check_ensemble, format_report

    show_progress(quiet)
    report = check_ensemble(recipe)
    typer.echo(json.dumps(report, indent=2) if wants_json(output_format, as_json) else format_report(report))
    if report["problems"]:
        sys.stderr.write(f"fusekit: {len(report['problems'])} problem(s) found\n")
