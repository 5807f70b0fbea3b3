"""``fusekit select``: pick k of N experts for a data file and write a recipe that uses them."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fusekit.cli.app import app
from fusekit.cli.options import (
    BatchSizeOpt,
    Device,
    DeviceOpt,
    Format,
    FormatOpt,
    JsonOpt,
    NoCacheOpt,
    QuietOpt,
    show_progress,
    wants_json,
)


class Method(str, Enum):
    greedy = "greedy"
    cluster = "cluster"


class Objective(str, Enum):
    ensemble = "ensemble"
    merge = "merge"


SelectDataOpt = Annotated[Path, typer.Option("--data", help="JSONL file of {\"text\": ...} rows, or a plain "
                                             "UTF-8 text file.", show_default=False, metavar="FILE")]
KOpt = Annotated[int, typer.Option("-k", help="How many experts to keep (1 to the number of experts).",
                                   show_default=False)]
BaseOpt = Annotated[str | None, typer.Option("--base", help="The model every expert was fine-tuned from "
                                             "(needed to cluster full models; default: the adapters' base).",
                                             show_default=False)]
MethodOpt = Annotated[Method, typer.Option("--method", help="greedy: forward selection on bits per byte; "
                                           "cluster: average-linkage clusters of the experts' ΔW (cosine).")]
ObjectiveOpt = Annotated[Objective, typer.Option("--objective", help="Score a subset by its uniform "
                                                 "prob_avg ensemble (cheap, cached) or its uniform linear "
                                                 "merge (slow: one merge per candidate).")]
MergeClustersOpt = Annotated[bool, typer.Option("--merge-clusters", help="With --method cluster: merge "
                                                "each cluster into one expert (a uniform linear merge, "
                                                "written beside the recipe) instead of keeping its "
                                                "representative.")]
RecipeKindOpt = Annotated[Objective, typer.Option("--recipe", help="Write an ensemble recipe (prob_avg) or a "
                                                  "linear merge recipe of the chosen experts.")]
SelectOutOpt = Annotated[Path | None, typer.Option("--out", "-o", help="Recipe to write (default: "
                                                   "selected-METHOD-kK.yaml in the current folder).",
                                                   show_default=False)]


@app.command("select", epilog="Example: fusekit select demo-out/experts/lora/python demo-out/experts/lora/c "
                              "demo-out/experts/lora/prose --data demo-out/experts/heldout/mixed.txt -k 2")
def select(
    experts: Annotated[list[str], typer.Argument(help="Candidate experts: LoRA adapters, base+adapter or "
                                                 "full fine-tunes.", show_default=False)],
    data: SelectDataOpt,
    k: KOpt,
    base: BaseOpt = None,
    method: MethodOpt = Method.greedy,
    objective: ObjectiveOpt = Objective.ensemble,
    merge_clusters: MergeClustersOpt = False,
    recipe_kind: RecipeKindOpt = Objective.ensemble,
    out: SelectOutOpt = None,
    device: DeviceOpt = Device.cpu,
    batch_size: BatchSizeOpt = 8,
    no_cache: NoCacheOpt = False,
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Choose K of the EXPERTs for the --data text: greedy forward selection on bits per byte, or
    hierarchical clustering of their weight updates; print each step and write a recipe using them."""
    from fusekit.errors import FusekitError
    from fusekit.io.outputs import check_out_file
    from fusekit.select.data import read_data_texts
    from fusekit.select.greedy import check_k
    from fusekit.select.recipes import ensemble_recipe_text, merge_recipe_text, write_recipe
    from fusekit.select.run import SelectOptions, select_experts

    show_progress(quiet)
    check_k(k, len(experts))
    if merge_clusters and method is not Method.cluster:
        raise FusekitError("--merge-clusters merges the clusters of --method cluster; add --method cluster")
    out = check_out_file(out or Path(f"selected-{method.value}-k{k}.yaml"), option="--out",
                         inputs=[("data file", data)])
    texts = read_data_texts(data)
    options = SelectOptions(k=k, method=method.value, objective=objective.value, base=base,
                            merge_clusters=merge_clusters, experts_dir=out.with_name(f"{out.stem}-experts"),
                            device=device.value, use_cache=not no_cache, batch_size=batch_size)
    sel = select_experts(experts, texts, options)
    comment = (f"written by fusekit select: {method.value}, k={k}, data {data}; "
               f"{sel.score:.4f} bits/byte ({objective.value} objective)")
    text = (ensemble_recipe_text(sel.members, comment=comment) if recipe_kind is Objective.ensemble
            else merge_recipe_text(sel.members, comment=comment, base=base))
    write_recipe(out, text)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps({**sel.to_json(), "recipe": str(out)}, indent=2))
        return
    for line in sel.text_lines():
        typer.echo(line)
    typer.echo(f"wrote {recipe_kind.value} recipe {out}")
