"""``fusekit score``: bits per byte and perplexity of plain model folders on text files."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.options import (
    BatchSizeOpt,
    ContextOpt,
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    JsonOpt,
    PickleOpt,
    TextsOpt,
    wants_json,
)

StrideOpt = Annotated[int | None, typer.Option("--stride", help="How far each further window moves "
                                               "(default: half the window).", show_default=False)]


@app.command(epilog="Example: fusekit score demo-out/experts/python demo-out/experts/c "
                    "--text demo-out/experts/heldout/mixed.txt")
def score(
    models: Annotated[list[str], typer.Argument(help="Model folders or Hub ids, as in a recipe's "
                                                "model: entries.", show_default=False)],
    text: TextsOpt,
    device: DeviceOpt = Device.cpu,
    context: ContextOpt = None,
    stride: StrideOpt = None,
    batch_size: BatchSizeOpt = 8,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
    allow_pickle: PickleOpt = False,
) -> None:
    """Bits per byte (comparable across tokenizers) and per-token perplexity of each MODEL on each
    --text file; measures merged outputs the way ensembles and routers are measured."""
    from fusekit.lm.load import load_lm
    from fusekit.lm.score import read_text_file, score_text

    texts = {path: read_text_file(path) for path in text}
    rows: list[dict[str, Any]] = []
    for ref in models:
        lm = load_lm(ref, device=device.value, allow_pickle=allow_pickle)
        for path, content in texts.items():
            result = score_text(lm, content, context=context, stride=stride, batch_size=batch_size)
            rows.append({"model": ref, "text": str(path), "n_bytes": result.n_bytes,
                         "n_tokens": result.n_tokens, "nll_nats": result.nll_nats,
                         "bits_per_byte": result.bits_per_byte, "perplexity": result.perplexity})
        del lm
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows)


def _print_table(rows: list[dict[str, Any]]) -> None:
    width_m = max(len("model"), *(len(r["model"]) for r in rows))
    width_t = max(len("text"), *(len(r["text"]) for r in rows))
    typer.echo(f"{'model':<{width_m}}  {'text':<{width_t}}  {'bytes':>9}  {'tokens':>8}  "
               f"{'bits/byte':>9}  {'perplexity':>10}")
    for r in rows:
        typer.echo(f"{r['model']:<{width_m}}  {r['text']:<{width_t}}  {r['n_bytes']:>9}  "
                   f"{r['n_tokens']:>8}  {r['bits_per_byte']:>9.4f}  {r['perplexity']:>10.3f}")
