"""Options and argument types shared by every ``fusekit`` command."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer


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
