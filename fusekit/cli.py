"""The ``fusekit`` command line: one thin function per command; the work is in the library.

User mistakes (:class:`fusekit.errors.FusekitError`) print one line to stderr and exit with status 2;
``FUSEKIT_DEBUG=1`` shows the traceback instead. Ctrl-C exits 130 and SIGTERM 143, in both cases
after the partial output has been removed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

from fusekit import __version__
from fusekit.errors import FusekitError

app = typer.Typer(
    name="fusekit", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Merge, ensemble and route large language models from one recipe format.",
)

_SIZE = re.compile(r"^\s*(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[A-Za-z]*)\s*$")
_UNITS = {"": 1, "b": 10**9, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


def parse_size(text: str, option: str = "--out-shard-size") -> int:
    """``500MB`` → 500_000_000; ``2GiB`` → 2_147_483_648; ``5B`` (mergekit: billion) → 5e9."""
    match = _SIZE.match(text)
    unit = match.group("unit").lower() if match else None
    if match is None or unit not in _UNITS:
        raise FusekitError(f"{option}: '{text}' is not a size; write e.g. 500MB, 2GB, 1GiB or 5B")
    size = int(float(match.group("number")) * _UNITS[unit])
    if size <= 0:
        raise FusekitError(f"{option}: '{text}' must be larger than zero")
    return size


class Device(str, Enum):
    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Format(str, Enum):
    text = "text"
    json = "json"


RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe (mergekit's format is accepted).",
                                           show_default=False)]
ShardSizeOpt = Annotated[str, typer.Option("--out-shard-size", help="Largest output shard: 500MB, "
                                           "2GB, 1GiB; 5B means 5 billion bytes as in mergekit.")]
MaxMemoryOpt = Annotated[str, typer.Option("--max-memory", help="Bound on resident memory, e.g. "
                                           "1GB, 512MB; large tensors are merged in row blocks.")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt checkpoints "
                                         "(loaded weights-only). Only for files you trust.")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"fusekit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
) -> None:
    """Merge, ensemble and route large language models from one recipe format."""


@app.command(epilog="Example: fusekit merge configs/linear.yaml ./merged --out-shard-size 2GB")
def merge(
    recipe: RecipeArg,
    out_dir: Annotated[Path, typer.Argument(help="Output folder; written atomically.",
                                            show_default=False)],
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty "
                                            "output folder.")] = False,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    device: Annotated[Device, typer.Option("--device", help="Where the arithmetic runs.")] = Device.cpu,
    allow_pickle: PickleOpt = False,
    copy_tokenizer: Annotated[bool, typer.Option("--copy-tokenizer/--no-copy-tokenizer",
                                                 help="Copy the tokenizer files.")] = True,
    random_seed: Annotated[int | None, typer.Option("--random-seed", help="Seed for stochastic "
                                                    "methods; picked and recorded when absent.")] = None,
    sequential: Annotated[bool, typer.Option("--sequential", help="Read, merge and write on one "
                                             "thread (same bytes, slower).")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
    output_format: Annotated[Format, typer.Option("--format", help="Summary as text or json.")] = Format.text,
) -> None:
    """Merge the models a recipe names into OUT_DIR, a transformers-loadable model."""
    from fusekit.merging import merge as run_merge
    from fusekit.plan.report import human_bytes

    result = run_merge(recipe, out_dir, overwrite=overwrite, out_shard_size=parse_size(out_shard_size),
                       device=device.value, allow_pickle=allow_pickle,
                       copy_tokenizer_files=copy_tokenizer, random_seed=random_seed,
                       max_memory=parse_size(max_memory, "--max-memory"), pipelined=not sequential,
                       progress=not quiet and sys.stderr.isatty() and not os.environ.get("CI"))
    stats = result.stats
    if output_format is Format.json:
        typer.echo(json.dumps({"out_dir": str(out_dir), "tensors": stats.tensors,
                               "bytes_read": stats.bytes_read, "bytes_written": stats.bytes_written,
                               "shards": len(stats.files), "seconds": stats.seconds,
                               "random_seed": result.seed,
                               "peak_rss_bytes": stats.peak_rss_bytes}, indent=2))
    elif not quiet:
        typer.echo(f"merged {stats.tensors} tensors ({result.plan.recipe.merge_method}, "
                   f"{len(result.plan.models)} models) into {out_dir}: "
                   f"{human_bytes(stats.bytes_written)} in {len(stats.files)} shard(s), "
                   f"{stats.seconds:.1f} s, peak memory {human_bytes(stats.peak_rss_bytes)}")


@app.command(epilog="Example: fusekit plan configs/linear.yaml --verbose")
def plan(
    recipe: RecipeArg,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="One line per tensor.")] = False,
    output_format: Annotated[Format, typer.Option("--format", help="text or json.")] = Format.text,
    out_shard_size: ShardSizeOpt = "5GB",
    max_memory: MaxMemoryOpt = "1GB",
    allow_pickle: PickleOpt = False,
) -> None:
    """Dry run: check a recipe and show what would be read, computed and written (no tensor data
    is read)."""
    from fusekit.merging import plan as build
    from fusekit.plan.report import format_plan, plan_summary

    merge_plan = build(recipe, allow_pickle=allow_pickle)
    limits = {"max_shard_bytes": parse_size(out_shard_size),
              "max_memory": parse_size(max_memory, "--max-memory")}
    if output_format is Format.json:
        summary: dict[str, Any] = plan_summary(merge_plan, **limits)
        typer.echo(json.dumps(summary, indent=2))
    else:
        typer.echo(format_plan(merge_plan, verbose=verbose, **limits))


class Terminated(KeyboardInterrupt):
    """Raised by the SIGTERM handler so that cleanup runs as for Ctrl-C."""


_signals: list[int] = []  # typer turns KeyboardInterrupt into exit code 130; this says which


def _on_sigterm(signum: int, frame: object) -> NoReturn:
    _signals.append(signum)
    raise Terminated()


def _fail(message: str, code: int) -> NoReturn:
    typer.echo(f"fusekit: {message}", err=True)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    logging.basicConfig(format="fusekit: %(message)s", level=logging.WARNING, stream=sys.stderr)
    signal.signal(signal.SIGTERM, _on_sigterm)
    debug = os.environ.get("FUSEKIT_DEBUG") == "1"
    try:
        code = app(args=argv, prog_name="fusekit", standalone_mode=False)
    except typer.TyperException as exc:  # usage errors: bad option, missing argument
        show = getattr(exc, "show", None)
        if show is not None:
            show()
        else:
            typer.echo(f"fusekit: error: {exc}", err=True)
        raise SystemExit(getattr(exc, "exit_code", 2)) from None
    except (typer.Abort, KeyboardInterrupt):
        code = 130
    except FusekitError as exc:
        if debug:
            raise
        _fail(f"error: {exc}", exc.exit_code)
    if _signals or code == 130:
        _fail("interrupted; no output was left behind", 143 if _signals else 130)
    raise SystemExit(code if isinstance(code, int) else 0)
