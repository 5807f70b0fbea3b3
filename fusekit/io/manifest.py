"""sha256 digests of a folder's files, kept in the folder's own JSON metadata file and checked on load.

A folder fusekit writes as a unit (a router) names its files' digests under the key ``"sha256"`` of
its metadata file, together with a digest of the metadata itself: that one is taken over the
metadata's canonical JSON (sorted keys, no spaces, the self-digest left out), so it does not depend
on formatting and needs no second file. An edited value, a file from another folder or a truncated
file is then found before anything is used, and named.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from fusekit.io.files import file_sha256

DIGESTS_KEY = "sha256"


def canonical_sha256(payload: Any) -> str:
    """sha256 of ``payload`` as canonical JSON (sorted keys, compact, ASCII).

    Example:
        >>> canonical_sha256({"b": 1, "a": [1.5]}) == canonical_sha256({"a": [1.5], "b": 1})
        True
    """
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def with_digests(folder: Path, metadata_name: str, metadata: Mapping[str, Any],
                 files: Iterable[str]) -> dict[str, Any]:
    """``metadata`` plus the digests of ``files`` (those present in ``folder``) and of itself.

    Args:
        folder: where ``files`` are, already written.
        metadata_name: the name the metadata will be written under (its own digest's key).
        metadata: the JSON-able metadata, without a ``"sha256"`` key.
        files: names of the files to cover; a name that is not a file in ``folder`` is skipped.

    Returns:
        A new dict to write as ``folder / metadata_name``.
    """
    plain = json.loads(json.dumps(metadata))  # as it will read back: str keys, lists for tuples
    digests = {name: file_sha256(folder / name) for name in files if (folder / name).is_file()}
    plain[DIGESTS_KEY] = digests
    plain[DIGESTS_KEY] = {**digests, metadata_name: canonical_sha256(plain)}
    return dict(plain)


def digest_mismatch(folder: Path, metadata_name: str, metadata: Mapping[str, Any]) -> str | None:
    """The first file of ``folder`` that differs from ``metadata``'s digests, described; else None.

    Metadata without digests (written before they were recorded) is accepted as it is.

    Returns:
        A clause naming the file, e.g. ``"router/router.json was edited after it was written"``.
    """
    recorded = metadata.get(DIGESTS_KEY)
    if recorded is None:
        return None
    if not (isinstance(recorded, dict) and all(isinstance(v, str) for v in recorded.values())
            and metadata_name in recorded):
        return f"{folder / metadata_name}: its \"{DIGESTS_KEY}\" entry is damaged"
    files = {name: digest for name, digest in recorded.items() if name != metadata_name}
    if canonical_sha256({**metadata, DIGESTS_KEY: files}) != recorded[metadata_name]:
        return f"{folder / metadata_name}: was edited after fusekit wrote it (its digest differs)"
    for name, digest in sorted(files.items()):
        path = folder / name
        if Path(name).name != name or not path.is_file():
            return f"{path}: is missing, but {metadata_name} records it"
        if file_sha256(path) != digest:
            return (f"{path}: differs from the file {metadata_name} records (changed, truncated or "
                    "taken from another folder)")
    return None
