"""``fusekit lora extract``: a PEFT LoRA adapter from a fine-tune and its base."""

from __future__ import annotations

import json
from enum import Enum
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.helptext import FusekitTyper
from fusekit.cli.options import (
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    JsonOpt,
    MaxMemoryOpt,
    OutDirArg,
    OverwriteOpt,
    PickleOpt,
    QuietOpt,
    show_progress,
    wants_json,
)
from fusekit.sizes import parse_size

lora_app = FusekitTyper(name="lora", no_args_is_help=True, add_completion=False,
                       pretty_exceptions_enable=False, help="Work with LoRA adapters.",
                       epilog="Example: fusekit lora extract --base org/base --model org/tuned ./adapter "
                              "--rank 32")
app.add_typer(lora_app, name="lora")


class EmbeddingsMode(str, Enum):
    """What an extracted adapter does with the input embedding and the LM head."""

    full = "full"
    lora = "lora"
    skip = "skip"


class NormsMode(str, Enum):
    """What an extracted adapter does with norm modules that differ from the base."""

    save = "save"
    skip = "skip"


class SvdChoice(str, Enum):
    """Which SVD factors each module: ``auto`` takes the randomized one where it is faster."""

    auto = "auto"
    exact = "exact"
    randomized = "randomized"


BaseOpt = Annotated[str, typer.Option("--base", help="The base model (folder or Hub id); written as the "
                                      "adapter's base_model_name_or_path.", show_default=False)]
ModelOpt = Annotated[str, typer.Option("--model", help="The fine-tuned model (folder or Hub id).",
                                       show_default=False)]
RankOpt = Annotated[int | None, typer.Option("--rank", "-r", help="The same LoRA rank for every module.",
                                             show_default=False)]
EnergyOpt = Annotated[float | None, typer.Option(
    "--energy", help="Instead of --rank: per module, the smallest rank whose squared singular values hold "
    "this share of ||ΔW||², e.g. 0.9.", show_default=False)]
MaxRankOpt = Annotated[int | None, typer.Option("--max-rank", help="Largest rank --energy may pick "
                                                "(default: min(out, in)).", show_default=False)]
EmbeddingsOpt = Annotated[EmbeddingsMode, typer.Option(
    "--embeddings", help="Embeddings and LM head: full (saved whole as modules_to_save), lora "
    "(factored like the rest) or skip.")]
NormsOpt = Annotated[NormsMode, typer.Option("--norms", help="Norm modules that differ: save (whole, as "
                                             "modules_to_save) or skip (left as in the base).")]
SvdOpt = Annotated[SvdChoice, typer.Option("--svd", help="exact, randomized, or auto (randomized on "
                                           "large matrices with a small rank).")]


@lora_app.command("extract", epilog="Example: fusekit lora extract --base demo-out/models/base --model "
                                    "demo-out/models/math ./math-lora --energy 0.9 --max-rank 32")
def extract(
    out_dir: OutDirArg,
    base: BaseOpt,
    model: ModelOpt,
    rank: RankOpt = None,
    energy: EnergyOpt = None,
    max_rank: MaxRankOpt = None,
    embeddings: EmbeddingsOpt = EmbeddingsMode.full,
    norms: NormsOpt = NormsMode.save,
    svd: SvdOpt = SvdChoice.auto,
    device: DeviceOpt = Device.cpu,
    max_memory: MaxMemoryOpt = "4GB",
    overwrite: OverwriteOpt = False,
    allow_pickle: PickleOpt = False,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Factor each module's difference between MODEL and BASE by truncated SVD into OUT_DIR, a PEFT
    LoRA adapter; print each module's relative Frobenius error ||ΔW - BA|| / ||ΔW|| and the total."""
    from fusekit.lora.extract import extract_lora

    show_progress(quiet)
    result = extract_lora(base, model, out_dir, rank=rank, energy=energy, max_rank=max_rank,
                          embeddings=embeddings.value, norms=norms.value, svd=svd.value, device=device.value,
                          max_memory=parse_size(max_memory, "--max-memory"), overwrite=overwrite,
                          allow_pickle=allow_pickle)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps(result.as_dict(), indent=2))
    elif not quiet:
        _print_result(result)


def _print_result(result: Any) -> None:
    done = [m for m in result.modules if m.kind != "same"]
    width = max(len("module"), *(len(m.module) for m in done))
    typer.echo(f"{'module':<{width}}  {'shape':>11}  {'kind':<9}  {'rank':>4}  {'rel. error':>10}")
    for m in done:
        shape = "x".join(map(str, m.shape))
        typer.echo(f"{m.module:<{width}}  {shape:>11}  {m.kind:<9}  {m.rank or '-':>4}  "
                   f"{m.relative_error:>10.4f}")
    same = len(result.modules) - len(done)
    typer.echo(f"total relative error {result.total_relative_error:.4f} over {len(done)} modules "
               f"({same} equal to the base, skipped); adapter written to {result.out_dir} in "
               f"{result.seconds:.1f} s")
