"""Every option and argument type that more than one ``fusekit`` command takes, declared once.

A command names an option by its type alias (``device: DeviceOpt = Device.cpu``), so the flag, its
aliases and its help text are the same wherever it appears. Output format has two spellings on every
command that prints a report: ``--format json`` and its alias ``--json`` (see :func:`wants_json`).

Where two commands take the same flag with a different shape (a repeatable list in one, a single
value in the other; required in one, optional in the other), the option itself is still declared once
here (``_THRESHOLD`` and friends) and only the Python type beside it differs.

Example:
    >>> from fusekit.cli.options import Format, wants_json
    >>> wants_json(Format.text, as_json=True)
    True
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


class Device(str, Enum):
    """Where tensors are computed: ``auto`` picks CUDA when it is available."""

    cpu = "cpu"
    cuda = "cuda"
    auto = "auto"


class Format(str, Enum):
    """How a command prints its report: human text, or JSON for machines (always on stdout)."""

    text = "text"
    json = "json"


def wants_json(output_format: Format, as_json: bool) -> bool:
    """Whether a command prints JSON: ``--json`` is the same as ``--format json``.

    Args:
        output_format: The value of ``--format``.
        as_json: Whether ``--json`` was given.

    Returns:
        True for JSON output, False for text.

    Example:
        >>> wants_json(Format.json, as_json=False), wants_json(Format.text, as_json=False)
        (True, False)
    """
    return as_json or output_format is Format.json


def set_threads(threads: int | None) -> None:
    """``--threads``: torch's CPU threads for this process (None: torch's choice)."""
    if threads:
        import torch

        torch.set_num_threads(threads)


def show_progress(quiet: bool) -> bool:
    """Apply ``--quiet`` to every progress bar of the process (:func:`fusekit.progress.set_quiet`) and
    say whether bars are drawn: not with ``--quiet``, not when stderr is no terminal, not in CI.

    Every command that takes ``--quiet`` calls this first.

    Args:
        quiet: Whether ``--quiet`` was given.

    Returns:
        True when a progress bar should be drawn on stderr.
    """
    from fusekit import progress

    progress.set_quiet(quiet)
    return progress.enabled()


# -- arguments --------------------------------------------------------------------------------------

RecipeArg = Annotated[Path, typer.Argument(help="YAML recipe (mergekit's format is accepted).",
                                           show_default=False)]
OutDirArg = Annotated[Path, typer.Argument(help="Output folder; written atomically.", show_default=False)]

# -- output -----------------------------------------------------------------------------------------

FormatOpt = Annotated[Format, typer.Option("--format", help="Print the report as text, or as json "
                                           "(machine-readable, on stdout).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Same as --format json.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars (they are also off when "
                                        "stderr is not a terminal or CI is set) and no summary line.")]
NoCacheOpt = Annotated[bool, typer.Option("--no-cache", help="Score every example afresh: neither read "
                                          "nor save per-example scores in the fusekit cache folder.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty "
                                            "output folder.")]
_OUT = typer.Option("--out", help="Write the result to this path, atomically, instead of where the "
                    "command's description says it goes.", show_default=False)
OutOpt = Annotated[Path | None, _OUT]
PlotOpt = Annotated[Path | None, typer.Option("--plot", help="Also draw the report as a picture "
                                              "(.png, .svg or .pdf; needs the 'plot' extra).",
                                              show_default=False)]

# -- where and how the work runs ---------------------------------------------------------------------

DeviceOpt = Annotated[Device, typer.Option("--device", help="Where tensors are computed: cpu, cuda, "
                                           "or auto (CUDA when available).")]
ThreadsOpt = Annotated[int | None, typer.Option(
    "--threads", min=1, help="torch CPU threads (default: torch's choice; 1 is often fastest for small "
    "models on a busy machine).", show_default=False)]
BatchSizeOpt = Annotated[int, typer.Option("--batch-size", min=1, help="Inputs per forward pass "
                                           "(prompts, examples or text windows).")]
SeedOpt = Annotated[int | None, typer.Option(
    "--seed", "--random-seed", help="Seed for everything random (sampling, random gates, stochastic "
    "merge methods); default: the recipe's, else one is picked and recorded.", show_default=False)]
ShardSizeOpt = Annotated[str, typer.Option("--out-shard-size", help="Largest output shard: 500MB, "
                                           "2GB, 1GiB; 5B means 5 billion bytes as in mergekit.",
                                           metavar="SIZE")]
MaxMemoryOpt = Annotated[str, typer.Option("--max-memory", help="Bound on resident memory, e.g. "
                                           "1GB, 512MB; large tensors are merged in row blocks.",
                                           metavar="SIZE")]
PickleOpt = Annotated[bool, typer.Option("--allow-pickle", help="Accept .bin/.pt checkpoints "
                                         "(loaded weights-only). Only for files you trust.")]
StrictOpt = Annotated[bool, typer.Option("--strict", help="Refuse recipe settings that have no effect "
                                         "(mergekit ignores them; by default they are warnings).")]

# -- text, prompts and generation ----------------------------------------------------------------------

_TEXT = typer.Option("--text", help="UTF-8 text file to score; repeat it where the command takes "
                     "several.", show_default=False, metavar="FILE")
TextOpt = Annotated[Path, _TEXT]
TextsOpt = Annotated[list[Path], _TEXT]
ContextOpt = Annotated[int | None, typer.Option(
    "--context", min=1, help="Window length in tokens (default: the model's max positions, at most 1024; "
    "for an ensemble, its primary's).", show_default=False)]
_PROMPT = typer.Option("--prompt", help="Prompt text; repeat it where the command takes several.",
                       show_default=False)
PromptOpt = Annotated[str | None, _PROMPT]
PromptsOpt = Annotated[list[str] | None, _PROMPT]
_MAX_NEW_TOKENS = typer.Option("--max-new-tokens", help="Most tokens each answer adds (ensemble "
                               "default: the recipe's generation.max_new_tokens).")
MaxNewTokensOpt = Annotated[int, _MAX_NEW_TOKENS]
RecipeMaxNewTokensOpt = Annotated[int | None, _MAX_NEW_TOKENS]

# -- routing ---------------------------------------------------------------------------------------

_DATA = typer.Option("--data", help="JSONL file, one query per line: {\"text\": ...}, or {\"prompt\": "
                     "...} with a \"completion\" where route eval scores it.", show_default=False,
                     metavar="FILE")
DataOpt = Annotated[Path, _DATA]
OptionalDataOpt = Annotated[Path | None, _DATA]
_THRESHOLD = typer.Option("--threshold", help="Router threshold from 0 (dearest model) to 1 (cheapest); "
                          "route eval takes it repeatedly (default 0, 0.1, ..., 1).", show_default=False)
ThresholdOpt = Annotated[float | None, _THRESHOLD]
ThresholdsOpt = Annotated[list[float] | None, _THRESHOLD]
_SHARE = typer.Option("--share", help="Share of queries (0 to 1) that should go to models dearer than the "
                      "cheapest; route eval takes it repeatedly (default 0.25, 0.5, 0.75).",
                      show_default=False)
ShareOpt = Annotated[float, _SHARE]
SharesOpt = Annotated[list[float] | None, _SHARE]

# -- the Hub -----------------------------------------------------------------------------------------

PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repository as private "
                                          "(an existing one keeps its visibility).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch to push to (created "
                                                 "when missing); default main.", show_default=False,
                                                 metavar="BRANCH")]
CommitMessageOpt = Annotated[str | None, typer.Option("--commit-message", help="Commit message for the "
                                                      "upload.", show_default=False)]
