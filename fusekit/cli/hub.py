"""``fusekit push``: upload an existing merge output to the Hugging Face Hub."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fusekit.cli.app import app
from fusekit.cli.options import (
    CommitMessageOpt,
    Format,
    FormatOpt,
    JsonOpt,
    PrivateOpt,
    QuietOpt,
    RevisionOpt,
    show_progress,
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
    quiet: QuietOpt = False,
    output_format: FormatOpt = Format.text,
    as_json: JsonOpt = False,
) -> None:
    """Upload OUT_DIR to the Hub (token from HF_TOKEN or the cached login; never printed).

    Each request waits at most FUSEKIT_HUB_REQUEST_TIMEOUT seconds (60) for the server, and the
    whole push ends within FUSEKIT_HUB_TIMEOUT seconds (10 minutes plus 2 s per MiB), retries
    included.
    """
    from fusekit.io.hub import push_to_hub

    show_progress(quiet)
    result = push_to_hub(out_dir, repo_id, private=private, revision=revision,
                         commit_message=commit_message)
    if wants_json(output_format, as_json):
        typer.echo(json.dumps({"repo_id": result.repo_id, "revision": result.revision,
                               "commit_url": result.commit_url, "files": result.files,
                               "attempts": result.attempts, "up_to_date": result.up_to_date}, indent=2))
    else:
        typer.echo(push_line(result))


def push_line(result: Any) -> str:
    """What a push did, in one line: the commit, or that the Hub already held every file.

    Args:
        result: the :class:`~fusekit.io.hub.PushResult`.
    """
    where = f"{result.repo_id}@{result.revision}"
    if result.up_to_date:
        return f"up to date: no commit ({where} already holds these {result.files} files)"
    return f"pushed {result.files} files to {where}: {result.commit_url}"
