"""Options and argument types shared by every ``fusekit`` command."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from fusekit.errors import FusekitError

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


PrivateOpt = Annotated[bool, typer.Option("--private", help="Create the Hub repository as private "
                                          "(an existing one keeps its visibility).")]
RevisionOpt = Annotated[str | None, typer.Option("--revision", help="Hub branch to push to (created "
                                                 "when missing); default main.", show_default=False)]
CommitMessageOpt = Annotated[str | None, typer.Option("--commit-message", help="Commit message for the "
                                                      "upload.", show_default=False)]
OutDirArg = Annotated[Path, typer.Argument(help="Output folder; written atomically.", show_default=False)]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing, non-empty "
                                            "output folder.")]
