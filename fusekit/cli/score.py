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
    QuietOpt,
    TextsOpt,
    show_progress,
    wants_json,
)

StrideOpt = Annotated[int | None, typer.Option("--stride", help="How far each further window moves "
                                               "(default: half the window).", show_default=False)]
BytesOpt = Annotated[bool, typer.Option("--bytes", help="Score each model as a model over bytes: the next "
                                        "byte's probability summed over the tokenizations covering it.")]
BeamOpt = Annotated[int, typer.Option("--beam", min=1, max=64, help="With --bytes: tokenizations kept per "
                                      "byte offset (more: closer to exact, slower).")]


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
    quiet: QuietOpt = False,
    as_bytes: BytesOpt = False,
    beam: BeamOpt = 2,
) -> None:
    """Bits per byte (comparable across tokenizers) and per-token perplexity of each MODEL on each
    --text file; measures merged outputs the way ensembles and routers are measured. A MODEL may be
    an Arrow router folder (fusekit route build with router: arrow).

    --bytes reads each model as a model over bytes (perplexity is then per byte)."""
    from fusekit.lm.score import read_text_file, score_text
    from fusekit.progress import label

    show_progress(quiet)
    from fusekit.errors import FusekitError

    if as_bytes and (context is not None or stride is not None):
        raise FusekitError("--context and --stride window token-level scores; leave them out with --bytes")
    texts = {path: read_text_file(path) for path in text}
    rows: list[dict[str, Any]] = []
    for ref in models:
        lm = _load_model(ref, device=device.value, allow_pickle=allow_pickle)
        for path, content in texts.items():
            if as_bytes:
                rows.append(_byte_row(lm, ref, str(path), content, beam))
                continue
            result = score_text(lm, content, context=context, stride=stride, batch_size=batch_size,
                                desc=f"scoring {label(path)} with {label(ref)}")
            rows.append({"model": ref, "text": str(path), "n_bytes": result.n_bytes,
                         "n_tokens": result.n_tokens, "nll_nats": result.nll_nats,
                         "bits_per_byte": result.bits_per_byte, "perplexity": result.perplexity})
        del lm
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(rows, indent=2))
        return
    _print_table(rows)


def _load_model(ref: str, *, device: str, allow_pickle: bool) -> Any:
    """``ref`` loaded to score: a model reference, or an Arrow router folder (its base with every
    adapter and PEFT's Arrow routing); another kind of router folder is refused in one line."""
    from pathlib import Path

    from fusekit.lm.load import load_lm
    from fusekit.route.router import CONFIG_FILE, read_router_config, router_type

    try:
        is_router = (Path(ref) / CONFIG_FILE).is_file()
    except OSError:  # a name the file system refuses: load_lm says so in its own words
        is_router = False
    if not is_router:
        return load_lm(ref, device=device, allow_pickle=allow_pickle)
    kind = router_type(read_router_config(ref))
    if kind != "arrow":
        from fusekit.errors import FusekitError

        raise FusekitError(f"'{ref}' is a {kind} router, which picks a model per query, not a model; "
                           f"measure it with fusekit route eval {ref} --data FILE")
    from fusekit.route.arrow import load_arrow, load_arrow_lm

    return load_arrow_lm(load_arrow(ref), device=device)


def _byte_row(lm: Any, ref: str, path: str, content: str, beam: int) -> dict[str, Any]:
    """One ``--bytes`` row: the model's byte-level score, its beam and the mass the beam dropped."""
    from fusekit.ensemble.bytes import score_bytes

    result = score_bytes(lm, content, beam=beam)
    s = result.score
    return {"model": ref, "text": path, "n_bytes": s.n_bytes, "n_tokens": s.n_tokens, "nll_nats": s.nll_nats,
            "bits_per_byte": s.bits_per_byte, "perplexity": s.perplexity, "level": "bytes", "beam": beam,
            "pruned_nats": result.pruned_nats}


def _print_table(rows: list[dict[str, Any]]) -> None:
    width_m = max(len("model"), *(len(r["model"]) for r in rows))
    width_t = max(len("text"), *(len(r["text"]) for r in rows))
    typer.echo(f"{'model':<{width_m}}  {'text':<{width_t}}  {'bytes':>9}  {'tokens':>8}  "
               f"{'bits/byte':>9}  {'perplexity':>10}")
    for r in rows:
        typer.echo(f"{r['model']:<{width_m}}  {r['text']:<{width_t}}  {r['n_bytes']:>9}  "
                   f"{r['n_tokens']:>8}  {r['bits_per_byte']:>9.4f}  {r['perplexity']:>10.3f}")
