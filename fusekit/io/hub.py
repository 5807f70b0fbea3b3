"""Publishing a merged model to the Hugging Face Hub.

:func:`push_to_hub` checks that a folder is a complete fusekit output (weights, config, and, when it
has a ``fusekit.lock``, files whose sha256 still match it), creates the repository if needed, creates
the branch when a revision is given, and uploads the folder with huggingface_hub in one commit
(large files through its LFS or Xet transfer). Transient failures (connection errors, HTTP 408, 429
and 5xx) are retried with exponential backoff; a refused token, missing access or an unknown
repository is one line naming the repository and what to do.

The token comes from ``HF_TOKEN`` or the cached login (``hf auth login``), as huggingface_hub finds
it; fusekit never prints, logs or writes it.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from fusekit.errors import FusekitError, HubError
from fusekit.io.layout import INDEX_FILE
from fusekit.io.writer import PARTIAL_MARKER
from fusekit.version import __version__

log = logging.getLogger("fusekit")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_RETRIES = 4
RETRY_DELAY_ENV = "FUSEKIT_HUB_RETRY_DELAY"  # first backoff delay in seconds (default 2)


@dataclass(frozen=True)
class PushResult:
    """Where the upload went: the repository, the branch and the commit."""

    repo_id: str
    revision: str
    commit_url: str
    files: int
    attempts: int


def check_repo_id(repo_id: str) -> str:
    """``org/name`` as the Hub spells repository ids; anything else is a one-line error."""
    from fusekit.io.refs import _HUB_ID

    if not _HUB_ID.match(repo_id) or len(repo_id) > 96 or ".." in repo_id:
        raise FusekitError(f"'{repo_id}' is not a Hub repository id; write it as org/name "
                           "(letters, digits, '-', '_', '.')")
    return repo_id


def check_output(folder: Path) -> list[Path]:
    """The files of a finished fusekit output folder, refusing partial or modified ones."""
    from fusekit.io.lock import LOCK_FILE, read_lock, verify_outputs

    folder = Path(folder)
    if not folder.is_dir():
        raise FusekitError(f"'{folder}' is not a folder; push the output folder of a merge")
    if PARTIAL_MARKER in folder.name:
        raise FusekitError(f"'{folder}' is the partial output of an unfinished merge; finish it "
                           "(fusekit merge --resume) before pushing")
    weights = sorted(folder.glob("*.safetensors"))
    if not (folder / "config.json").is_file() or not weights:
        raise FusekitError(f"'{folder}' holds no config.json and .safetensors weights; it is not a "
                           "merged model")
    if len(weights) > 1 and not (folder / INDEX_FILE).is_file():
        raise FusekitError(f"'{folder}' has {len(weights)} shards but no {INDEX_FILE}; the output is "
                           "incomplete")
    lock_path = folder / LOCK_FILE
    if lock_path.is_file():
        lock = read_lock(lock_path)
        changed = verify_outputs(lock, folder)
        if changed is not None:
            raise FusekitError(f"'{folder}': {changed} since the merge ({LOCK_FILE} records "
                               "other content); merge again before pushing")
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False,
                revision: str | None = None, commit_message: str | None = None,
                retries: int = DEFAULT_RETRIES, retry_delay: float | None = None) -> PushResult:
    """Upload a merged model folder to the Hub repository ``repo_id`` (created when missing).

    Args:
        folder: a finished fusekit output folder.
        repo_id: ``org/name``.
        private: create the repository as private (an existing one keeps its visibility).
        revision: branch to commit to (created from the default branch when missing); None: main.
        commit_message: defaults to "Upload <folder name> merged with fusekit <version>".
        retries: extra attempts after a transient failure.
        retry_delay: first backoff delay in seconds, doubled on each retry (default 2, or
            ``FUSEKIT_HUB_RETRY_DELAY``).

    Example:
        >>> push_to_hub("./merged", "my-org/my-merge", private=True)  # doctest: +SKIP
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    files = check_output(folder)
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it to push to the Hub")
    delay = retry_delay if retry_delay is not None else float(os.environ.get(RETRY_DELAY_ENV, "2"))
    message = commit_message or f"Upload {folder.resolve().name} merged with fusekit {__version__}"
    api = HfApi()  # the token: HF_TOKEN or the cached login, resolved by huggingface_hub
    attempt = 0
    while True:
        attempt += 1
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                     revision=revision, commit_message=message,
                                     ignore_patterns=[".*"])
            return PushResult(repo_id=repo_id, revision=revision or "main",
                              commit_url=str(getattr(info, "commit_url", info)), files=len(files),
                              attempts=attempt)
        except Exception as exc:  # huggingface_hub and its HTTP client raise many types
            status = _status(exc)
            transient = status in TRANSIENT_STATUS or (status is None and _is_network_error(exc))
            if transient and attempt <= retries:
                wait = delay * 2 ** (attempt - 1)
                log.warning("Hub request failed (%s); retrying in %.1f s (attempt %d of %d)",
                            f"HTTP {status}" if status else type(exc).__name__, wait, attempt + 1,
                            retries + 1)
                time.sleep(wait)
                continue
            cause = exc if os.environ.get("FUSEKIT_DEBUG") == "1" else None
            raise _hub_error(exc, status, repo_id, attempt) from cause


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _is_network_error(exc: BaseException) -> bool:
    """Connection refused or reset, timeouts: worth another try."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "ConnectionError",
                         "Timeout", "RemoteProtocolError", "ReadError", "WriteError"}) \
        or isinstance(exc, (ConnectionError, TimeoutError))


def _hub_error(exc: BaseException, status: int | None, repo_id: str, attempts: int) -> FusekitError:
    """One line naming the repository and the fix; never the token, never the server's text."""
    from huggingface_hub import constants

    if isinstance(exc, FusekitError):
        return exc
    if status == 401:
        return HubError(f"the Hub refused the token (HTTP 401) while pushing to '{repo_id}'; set "
                        "HF_TOKEN to a valid token with write access or run `hf auth login`")
    if status == 403:
        return HubError(f"the token may not write to '{repo_id}' (HTTP 403); use a token with "
                        "write access to that user or organisation")
    if status == 404:
        return HubError(f"'{repo_id}' was not found on the Hub (HTTP 404); check the name and that "
                        "the organisation exists")
    if status is not None:
        return HubError(f"the Hub answered HTTP {status} while pushing to '{repo_id}' "
                        f"({attempts} attempt(s)); try again later")
    if type(exc).__name__ in ("LocalTokenNotFoundError",):
        return HubError("no Hub token found; set HF_TOKEN or run `hf auth login`")
    if _is_network_error(exc):
        return HubError(f"cannot reach the Hub at {constants.ENDPOINT} after {attempts} attempt(s) "
                        f"({type(exc).__name__}); check the network or HF_ENDPOINT")
    if isinstance(exc, OSError):
        return HubError(f"cannot read the output while pushing to '{repo_id}' ({exc.strerror or exc})")
    return HubError(f"pushing to '{repo_id}' failed ({type(exc).__name__}); run with FUSEKIT_DEBUG=1 "
                    "for details")
