"""``fusekit schema`` (a recipe kind's JSON Schema, for editor completion) and ``fusekit validate``
(check a recipe file without reading any model).

``schema`` imports pydantic and the recipe models only: no torch, no transformers.
"""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.options import OutOpt, QuietOpt, RecipeArg, StrictOpt, show_progress
from fusekit.errors import OutputPathError
from fusekit.io.files import atomic_file

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


class RecipeKind(str, Enum):
    """The recipe kinds, one per command family."""

    merge = "merge"
    moe = "moe"
    ensemble = "ensemble"
    route = "route"


def recipe_schema(kind: RecipeKind) -> dict[str, Any]:
    """The JSON Schema of one recipe kind, from its pydantic model.

    Example:
        >>> recipe_schema(RecipeKind.merge)["title"]
        'fusekit merge recipe'
    """
    model: Any
    if kind is RecipeKind.merge:
        from fusekit.recipe.schema import MergeRecipe as model
    elif kind is RecipeKind.moe:
        from fusekit.moe.recipe import MoeRecipe as model
    elif kind is RecipeKind.ensemble:
        from fusekit.ensemble.recipe import EnsembleRecipe as model
    else:
        from fusekit.route.recipe import RouteRecipe as model
    schema = model.model_json_schema()
    return {"$schema": SCHEMA_DIALECT, **schema, "title": f"fusekit {kind.value} recipe"}


KindArg = Annotated[RecipeKind, typer.Argument(help="Which recipe: merge, moe, ensemble or route.",
                                               show_default=False)]


@app.command("schema", epilog="Example: fusekit schema merge --out merge.schema.json")
def schema_command(kind: KindArg, out: OutOpt = None, quiet: QuietOpt = False) -> None:
    """Print the JSON Schema of a recipe kind (for editor completion and checks)."""
    show_progress(quiet)
    text = json.dumps(recipe_schema(kind), indent=2) + "\n"
    if out is None:
        typer.echo(text, nl=False)
        return
    _write_atomically(out, text)
    if not quiet:
        typer.echo(f"wrote the {kind.value} recipe schema to {out}", err=True)


def _write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to a sibling temp file and rename it over ``path``."""
    if path.is_dir() or (path.exists() and not path.is_file()):
        raise OutputPathError(f"--out '{path}' is not a regular file; give a file path such as schema.json")
    if not path.parent.is_dir():
        raise OutputPathError(f"--out '{path}': folder {path.parent} does not exist; create it first")
    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")


@app.command(epilog="Example: fusekit validate configs/ties.yaml --strict")
def validate(recipe: RecipeArg, strict: StrictOpt = False, quiet: QuietOpt = False) -> None:
    """Check a merge, multi-stage, MoE or tune recipe without reading any model (fusekit plan also
    checks the models)."""
    show_progress(quiet)
    from fusekit.moe.recipe import is_moe_recipe, load_moe_recipe
    from fusekit.recipe import load_merge_recipe
    from fusekit.recipe.stages import is_multistage, load_stages
    from fusekit.tune.spec import is_tune_recipe, load_tune_spec

    if is_tune_recipe(recipe):
        spec = load_tune_spec(recipe)
        typer.echo(f"{recipe}: a valid tune recipe ({spec.kind}, {len(spec.space.dims)} dimensions, "
                   f"optimizer {spec.settings.optimizer})")
    elif is_moe_recipe(recipe):
        moe = load_moe_recipe(recipe)[0]
        typer.echo(f"{recipe}: a valid MoE recipe ({len(moe.experts)} experts)")
    elif is_multistage(recipe):
        stages = load_stages(recipe)
        typer.echo(f"{recipe}: a valid multi-stage recipe ({len(stages.stages)} stages)")
    else:
        merge = load_merge_recipe(recipe, strict=strict)[0]
        typer.echo(f"{recipe}: a valid merge recipe ({merge.merge_method}, "
                   f"{len(merge.model_refs())} models)")
