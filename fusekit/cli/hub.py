"""``fusekit push``: upload an existing merge output to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fusekit.cli.app import app
from fusekit.cli.options import (
    CommitMessageOpt,
    Format,
    FormatOpt,
    JsonOpt,
    PrivateOpt,
    RevisionOpt,
    wants_json,
)


@app.command(epilog="Example: fusekit push ./merged my-org/my-merge --private --revision v2")
def push(
    out_dir: Annotated[Path, typer.Argument(help="A finished `fusekit merge` output folder.",
                                            show_default=False)],
    repo_id: Annotated[str, typer.Argument(help="Hub repository, org/name (created when missing).",
                                           show_default=False)],
    private: PrivateOpt = False,
    revision: RevisionOpt = None,
    commit_message: CommitMessageOpt = None,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Upload OUT_DIR to the Hub (token from HF_TOKEN or the cached login; never printed).

    Each request waits at most FUSEKIT_HUB_REQUEST_TIMEOUT seconds (60) for the server, and the
    whole push ends within FUSEKIT_HUB_TIMEOUT seconds (10 minutes plus 2 s per MiB), retries
    included.
    """
    from fusekit.io.hub import push_to_hub

    result = push_to_hub(out_dir, repo_id, private=private, revision=revision,
                         commit_message=commit_message)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps({"repo_id": result.repo_id, "revision": result.revision,
                               "commit_url": result.commit_url, "files": result.files,
                               "attempts": result.attempts}, indent=2))
    else:
        typer.echo(f"pushed {result.files} files to {result.repo_id}@{result.revision}: "
                   f"{result.commit_url}")
