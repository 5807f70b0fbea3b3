"""Publishing a merged model to the Hugging Face Hub.

:func:`push_to_hub` checks that a folder is a complete fusekit output (weights, config, and, when it
has a ``fusekit.lock``, files whose sha256 still match it), creates the repository if needed, creates
the branch when a revision is given, and uploads the folder with huggingface_hub in one commit
(large files through its LFS or Xet transfer). When the branch already holds every file with the
same content (LFS files compared by sha256, the others by git blob id), nothing is uploaded and no
commit is made, so rebuilding a locked, byte-identical output and pushing it again is a no-op.
Transient failures (connection errors, HTTP 408, 429 and 5xx) are retried with exponential backoff;
a refused token, missing access or an unknown repository is one line naming the repository and what
to do. Every request has connect and read timeouts and the whole push a deadline
(:mod:`fusekit.io.hub_deadline`), so a server that never answers, drips bytes or resets connections
ends in one line, not a hang.

The token comes from ``HF_TOKEN`` or the cached login (``hf auth login``), as huggingface_hub finds
it; fusekit never prints, logs or writes it.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fusekit.errors import FusekitError, HubError, HubTimeoutError
from fusekit.io.files import PARTIAL_MARKER
from fusekit.io.hub_deadline import (
    BASE_DEADLINE,
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_RETRY_DELAY,
    REQUEST_TIMEOUT_ENV,
    RETRY_DELAY_ENV,
    TIMEOUT_ENV,
    Deadline,
    DeadlineExceeded,
    check_seconds,
    default_deadline,
    env_seconds,
    limited_session,
    run_within,
)
from fusekit.io.refs import SAFETENSORS_INDEX as INDEX_FILE
from fusekit.progress import hub_bars
from fusekit.version import __version__

log = logging.getLogger("fusekit")
TRANSIENT_STATUS = frozenset({408, 429, 500, 502, 503, 504})
DEFAULT_RETRIES = 4
__all__ = ["RETRY_DELAY_ENV", "PushResult", "check_output", "check_repo_id", "check_settings", "push_to_hub"]


@dataclass(frozen=True)
class PushResult:
    """Where the upload went: the repository, the branch and the commit (None, with ``up_to_date``,
    when the branch already held every file and no commit was made)."""

    repo_id: str
    revision: str
    commit_url: str | None
    files: int
    attempts: int
    up_to_date: bool = False


def check_repo_id(repo_id: str) -> str:
    """``org/name`` as the Hub spells repository ids; anything else is a one-line error."""
    from fusekit.io.refs import _HUB_ID

    if not _HUB_ID.match(repo_id) or len(repo_id) > 96 or ".." in repo_id:
        raise FusekitError(f"'{repo_id}' is not a Hub repository id; write it as org/name "
                           "(letters, digits, '-', '_', '.')")
    return repo_id


def check_settings() -> None:
    """Check the time settings (``FUSEKIT_HUB_TIMEOUT``, ``FUSEKIT_HUB_REQUEST_TIMEOUT``,
    ``FUSEKIT_HUB_RETRY_DELAY``) before any work, e.g. before a merge that ends in a push.

    Raises:
        FusekitError: one of them is set to something other than a number of seconds it allows.
    """
    env_seconds(RETRY_DELAY_ENV, DEFAULT_RETRY_DELAY, allow_zero=True)
    env_seconds(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT)
    env_seconds(TIMEOUT_ENV, BASE_DEADLINE)


def check_output(folder: Path) -> list[Path]:
    """The files of a finished fusekit output folder, refusing partial or modified ones."""
    from fusekit.io.lock import LOCK_FILE, verify_output

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
    if (folder / LOCK_FILE).is_file():
        verify_output(folder)  # re-hashes every file: an edited or added file is never pushed
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def push_to_hub(folder: str | Path, repo_id: str, *, private: bool = False,
                revision: str | None = None, commit_message: str | None = None,
                retries: int = DEFAULT_RETRIES, retry_delay: float | None = None,
                timeout: float | None = None) -> PushResult:
    """Upload a merged model folder to the Hub repository ``repo_id`` (created when missing).

    Every request has connect and read timeouts (``FUSEKIT_HUB_REQUEST_TIMEOUT``, default 60 s) and
    the whole push a deadline, retries included; see :mod:`fusekit.io.hub_deadline`.

    Args:
        folder: a finished fusekit output folder.
        repo_id: ``org/name``.
        private: create the repository as private (an existing one keeps its visibility).
        revision: branch to commit to (created from the default branch when missing); None: main.
        commit_message: defaults to "Upload <folder name> merged with fusekit <version>".
        retries: extra attempts after a transient failure.
        retry_delay: first backoff delay in seconds, doubled on each retry (default 2, or
            ``FUSEKIT_HUB_RETRY_DELAY``).
        timeout: seconds the whole push may take (default ``FUSEKIT_HUB_TIMEOUT``, or 10 minutes
            plus 2 s per MiB of files).

    Returns:
        Where the files went and how many attempts it took.

    Raises:
        FusekitError: the folder is not a finished output, or a setting is not a valid number.
        HubError: the Hub refused the push or did not answer in time (one line, no token).

    Example:
        >>> push_to_hub("./merged", "my-org/my-merge", private=True)  # doctest: +SKIP
    """
    folder = Path(folder)
    check_repo_id(repo_id)
    delay = (env_seconds(RETRY_DELAY_ENV, DEFAULT_RETRY_DELAY, allow_zero=True) if retry_delay is None
             else check_seconds("retry_delay", retry_delay, DEFAULT_RETRY_DELAY, allow_zero=True))
    request_timeout = env_seconds(REQUEST_TIMEOUT_ENV, DEFAULT_REQUEST_TIMEOUT)
    files = check_output(folder)
    default = default_deadline(sum(p.stat().st_size for p in files))
    seconds = (env_seconds(TIMEOUT_ENV, default) if timeout is None
               else check_seconds("timeout", timeout, default))
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise HubError("HF_HUB_OFFLINE is set, so nothing can be pushed; unset it to push to the Hub")
    message = commit_message or f"Upload {folder.resolve().name} merged with fusekit {__version__}"
    deadline = Deadline(seconds=seconds, request_timeout=request_timeout)
    attempts = [0]

    def upload() -> PushResult:
        # The limits are lifted when this thread ends, so an abandoned push never goes on unbounded.
        with limited_session(deadline):
            return _push_with_retries(folder, repo_id, private=private, revision=revision,
                                      message=message, files=files, retries=retries, delay=delay,
                                      deadline=deadline, attempts=attempts)

    try:
        return run_within(deadline, upload)
    except Exception as exc:  # huggingface_hub and its HTTP client raise many types
        cause = exc if os.environ.get("FUSEKIT_DEBUG") == "1" else None
        raise _hub_error(exc, _status(exc), repo_id, attempts[0], deadline) from cause


def _push_with_retries(folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str,
                       files: list[Path], retries: int, delay: float, deadline: Deadline,
                       attempts: list[int]) -> PushResult:
    """Create the repository (and branch) and upload in one commit unless the branch already holds
    every file, retrying transient failures."""
    from huggingface_hub import HfApi

    api = HfApi()  # the token: HF_TOKEN or the cached login, resolved by huggingface_hub
    while True:
        attempts[0] += 1
        try:
            api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
            if revision is not None:
                api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
            held = PushResult(repo_id=repo_id, revision=revision or "main", commit_url=None,
                              files=len(files), attempts=attempts[0], up_to_date=True)
            if hub_holds(api, files, repo_id, revision):
                return held
            with hub_bars():
                info = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model",
                                         revision=revision, commit_message=message, ignore_patterns=[".*"])
            return replace(held, commit_url=str(getattr(info, "commit_url", info)), up_to_date=False)
        except Exception as exc:
            status = _status(exc)
            transient = status in TRANSIENT_STATUS or (status is None and _is_network_error(exc))
            wait = delay * 2 ** (attempts[0] - 1)
            if not transient or attempts[0] > retries or deadline.over or wait >= deadline.remaining():
                raise
            log.warning("Hub request failed (%s); retrying in %.1f s (attempt %d of %d)",
                        f"HTTP {status}" if status else type(exc).__name__, wait, attempts[0] + 1,
                        retries + 1)
            if not deadline.sleep(wait):
                raise


def hub_holds(api: Any, files: list[Path], repo_id: str, revision: str | None) -> bool:
    """True when the branch ``revision`` of ``repo_id`` already holds every one of ``files`` (by name)
    with the same content: an LFS file's sha256 (its LFS oid), another file's git blob id.

    Args:
        api: a ``huggingface_hub.HfApi``.
        files: the local files, uploaded under their names.
        repo_id / revision: the repository and branch (None: main).
    """
    from huggingface_hub import RepoFile
    from huggingface_hub.errors import EntryNotFoundError, RevisionNotFoundError

    from fusekit.io.digests import DigestCache

    try:
        found = api.get_paths_info(repo_id, [p.name for p in files], revision=revision, repo_type="model")
    except (EntryNotFoundError, RevisionNotFoundError):
        return False
    remote = {entry.path: entry for entry in found if isinstance(entry, RepoFile)}
    cache = DigestCache()  # the digests check_output has just computed
    try:
        for path in files:
            entry = remote.get(path.name)
            if entry is None or entry.size != path.stat().st_size:
                return False
            same = (entry.lfs.sha256 == cache.digest(path) if entry.lfs is not None
                    else entry.blob_id == git_blob_id(path))
            if not same:
                return False
    finally:
        cache.save()
    return True


def git_blob_id(path: Path) -> str:
    """The git object id of a file's content: sha1 of ``blob <size>\\0`` and the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with path.open("rb") as handle:
        while block := handle.read(2**20):
            digest.update(block)
    return digest.hexdigest()


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


def _hub_error(exc: BaseException, status: int | None, repo_id: str, attempts: int,
               deadline: Deadline) -> FusekitError:
    """One line naming the repository and the fix; never the token, never the server's text."""
    from huggingface_hub import constants

    if isinstance(exc, FusekitError):
        return exc
    if isinstance(exc, DeadlineExceeded) or (_is_network_error(exc) and deadline.remaining() <= 0):
        return HubTimeoutError(f"pushing to '{repo_id}' did not finish within {deadline.seconds:g} s "
                               f"({TIMEOUT_ENV}): the Hub at {constants.ENDPOINT} stopped answering; "
                               f"check the network, or raise {TIMEOUT_ENV} for a slow link")
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
