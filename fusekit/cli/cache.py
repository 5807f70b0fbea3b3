"""``fusekit cache info | clear``: what fusekit keeps in its cache folder, and emptying it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Annotated

import typer

from fusekit.cli.app import app
from fusekit.cli.helptext import FusekitTyper
from fusekit.cli.options import Format, FormatOpt, JsonOpt, QuietOpt, show_progress, wants_json

cache_app = FusekitTyper(name="cache", no_args_is_help=True, add_completion=False,
                         help="Show or empty the fusekit cache folder (scores, input digests, alignment "
                              "tables).",
                         epilog="Example: fusekit cache info\nfusekit cache clear --all")
app.add_typer(cache_app, name="cache")

ALIGN_DIR = "align"  # vocabulary alignment tables (fusekit.ensemble.methods)
AllOpt = Annotated[bool, typer.Option("--all", help="Also delete the input digests and vocabulary "
                                      "alignment tables (rebuilt when next needed).")]


def _folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) if root.is_dir() else 0


@cache_app.command("info", epilog="Example: fusekit cache info --json")
def info(quiet: QuietOpt = False, output_format: FormatOpt = Format.text, as_json: JsonOpt = False) -> None:
    """Where the cache folder is, how many per-example scores it holds and how many bytes it uses.

    Set FUSEKIT_CACHE to move it, FUSEKIT_SCORE_CACHE=0 to stop caching scores and
    FUSEKIT_SCORE_CACHE_MAX_MB to bound them (the least recently used go first)."""
    from fusekit.cache import cache_folder
    from fusekit.lm.score_cache import ScoreCache

    show_progress(quiet)
    scores = ScoreCache().info()
    folder, total = cache_folder(), _folder_bytes(cache_folder())
    if wants_json(output_format, as_json):
        typer.echo(json.dumps({"folder": str(folder), "bytes": total, "scores": scores}, indent=2))
        return
    state = "on" if scores["enabled"] else "off (FUSEKIT_SCORE_CACHE=0)"
    typer.echo(f"cache folder: {folder} ({total / 2**20:.1f} MiB in all)")
    typer.echo(f"scores: {scores['scores']} in {scores['files']} file(s), {scores['bytes'] / 2**20:.1f} "
               f"of at most {scores['max_bytes'] / 2**20:.0f} MiB; caching {state}")


@cache_app.command("clear", epilog="Example: fusekit cache clear")
def clear(all_files: AllOpt = False, quiet: QuietOpt = False) -> None:
    """Delete the cached per-example scores (with --all, the input digests and alignment tables too)."""
    from fusekit.cache import cache_folder
    from fusekit.io.digests import CACHE_NAME
    from fusekit.lm.score_cache import ScoreCache

    show_progress(quiet)

    removed = ScoreCache().clear()
    folder = cache_folder()
    if all_files:  # only what fusekit writes there: the folder may be shared ($FUSEKIT_CACHE)
        (folder / CACHE_NAME).unlink(missing_ok=True)
        if (folder / ALIGN_DIR).is_dir() and not (folder / ALIGN_DIR).is_symlink():
            shutil.rmtree(folder / ALIGN_DIR, ignore_errors=True)
    if not quiet:
        what = "scores, input digests and alignment tables" if all_files else f"{removed} score file(s)"
        typer.echo(f"deleted {what} from {folder}")
