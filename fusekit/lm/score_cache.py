"""Per-text scores kept on disk, so that no model scores the same text twice.

Building a router, evaluating it, learning ensemble weights and tuning a merge all need every model's
score of every example, and each of them used to score everything again. A score here is keyed by

- the model's content digest: the size and sha256 of every file the model is loaded from (weights,
  config, tokenizer, and a LoRA adapter's files), as ``fusekit.lock`` records them
  (:class:`fusekit.io.lock.InputFingerprints`, whose digests are cached by file stat, so an unchanged
  model is not hashed again); a Hub model by its resolved commit;
- the scoring settings: requested ``context`` and ``stride``, the load ``dtype``, the device type
  (``cpu`` / ``cuda``: kernels differ in the last bits) and :data:`CONVENTION`;
- the sha256 of the text.

One JSON file per (model, settings) under ``<cache folder>/scores-v1/`` maps text digests to
``[n_bytes, n_tokens, nll_nats]``. Writes re-read the file, merge and rename a temporary file over
it, so concurrent runs never leave a torn file (at worst one run's new entries are lost and scored
again later). The folder is bounded (:data:`MAX_BYTES`, ``$FUSEKIT_SCORE_CACHE_MAX_MB``): the least
recently used files go first. ``FUSEKIT_SCORE_CACHE=0`` or ``--no-cache`` turns it off;
``fusekit cache info`` and ``fusekit cache clear`` show and empty it.

Example:
    >>> scores = score_texts_cached("demo-out/experts/python", ["def f():\\n"])  # doctest: +SKIP
    >>> scores[0].bits_per_byte  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusekit.cache import cache_folder
from fusekit.errors import FusekitError
from fusekit.io.refs import ResolvedModel
from fusekit.lm.score import TextScore

if TYPE_CHECKING:
    from fusekit.lm.load import LoadedLM

SCORES_DIR = "scores-v1"
CONVENTION = 1  # bump when lm.score changes what a score means
MAX_BYTES = 1024 * 2**20
log = logging.getLogger("fusekit")


def cache_enabled(use_cache: bool = True) -> bool:
    """Whether scores are cached: ``use_cache`` (False for ``--no-cache``) and not
    ``FUSEKIT_SCORE_CACHE=0``."""
    return use_cache and os.environ.get("FUSEKIT_SCORE_CACHE") != "0"


def max_bytes() -> int:
    """The cache's size bound: ``$FUSEKIT_SCORE_CACHE_MAX_MB`` megabytes, else :data:`MAX_BYTES`."""
    value = os.environ.get("FUSEKIT_SCORE_CACHE_MAX_MB", "")
    return int(float(value) * 2**20) if value.replace(".", "", 1).isdigit() else MAX_BYTES


def model_digest(model: ResolvedModel) -> str:
    """sha256 over what ``fusekit.lock`` records of ``model``'s files (sizes and digests; a Hub
    model's commit), adapters included."""
    from fusekit.io.lock import InputFingerprints

    record = InputFingerprints({"model": model}).result()["model"]
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def text_digest(text: str) -> str:
    """sha256 of the text's UTF-8 bytes."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ScoreKey:
    """What a score depends on besides the text: one cache file per key."""

    model: str  # model_digest
    context: int | None
    stride: int | None
    dtype: str | None
    device: str  # device type: cpu, cuda

    def settings(self) -> dict[str, Any]:
        return {"model": self.model, "context": self.context, "stride": self.stride, "dtype": self.dtype,
                "device": self.device, "convention": CONVENTION}

    def file_name(self) -> str:
        blob = json.dumps(self.settings(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:32] + ".json"


class ScoreCache:
    """Scores on disk, one file per :class:`ScoreKey`.

    Args:
        folder: the cache root (default :func:`fusekit.cache.cache_folder`); files go in
            ``folder/scores-v1``.
    """

    def __init__(self, folder: Path | None = None) -> None:
        self.folder = (folder or cache_folder()) / SCORES_DIR

    def get(self, key: ScoreKey, digests: Sequence[str]) -> dict[str, TextScore]:
        """The cached scores of those ``digests`` that have one (a corrupt file counts as empty)."""
        entries = self._read(self.folder / key.file_name())
        found = {d: TextScore(*entries[d]) for d in digests if d in entries}
        if found:
            _touch(self.folder / key.file_name())
        return found

    def put(self, key: ScoreKey, scores: dict[str, TextScore], *, ref: str) -> None:
        """Add ``scores`` (text digest → score) under ``key``; failures are logged, never raised."""
        path = self.folder / key.file_name()
        entries = self._read(path)  # merge with what another run may have written meanwhile
        entries.update({d: [s.n_bytes, s.n_tokens, s.nll_nats] for d, s in scores.items()})
        self._save(path, {**key.settings(), "ref": ref, "scores": entries}, "scores")

    def _save(self, path: Path, payload: dict[str, Any], what: str) -> None:
        """Write ``payload`` to ``path`` atomically, then prune; failures are logged, never raised."""
        temp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            temp.write_text(json.dumps(payload), encoding="utf-8")
            os.replace(temp, path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            log.info("could not save %s to %s (%s)", what, path, exc)
            return
        self.prune(max_bytes())

    @staticmethod
    def _read(path: Path) -> dict[str, list[Any]]:
        try:
            scores = json.loads(path.read_text(encoding="utf-8")).get("scores")
        except (OSError, ValueError, AttributeError, RecursionError):
            return {}
        if not isinstance(scores, dict):
            return {}
        return {d: v for d, v in scores.items() if _valid_entry(v)}

    def token_path(self, key: ScoreKey, digest: str) -> Path:
        """Where one text's per-token log-probabilities under ``key`` are kept: a ``tok-*.json`` file
        beside the scores, so it is bounded, listed and cleared with them."""
        return self.folder / f"tok-{key.file_name()[:24]}-{digest[:24]}.json"

    def get_tokens(self, key: ScoreKey, digest: str) -> list[float] | None:
        """The cached per-token log-probabilities of the text with ``digest``, or None."""
        path = self.token_path(key, digest)
        try:
            values = json.loads(path.read_text(encoding="utf-8")).get("logprobs")
        except (OSError, ValueError, AttributeError, RecursionError):
            return None
        if not isinstance(values, list) or not all(isinstance(v, (int, float)) for v in values):
            return None
        _touch(path)
        return [float(v) for v in values]

    def put_tokens(self, key: ScoreKey, digest: str, values: Sequence[float], *, ref: str) -> None:
        """Save one text's per-token log-probabilities; failures are logged, never raised."""
        payload = {**key.settings(), "ref": ref, "logprobs": list(values)}
        self._save(self.token_path(key, digest), payload, "token log-probabilities")

    def files(self) -> list[Path]:
        """The cache files, least recently used first."""
        try:
            found = [p for p in self.folder.glob("*.json") if p.is_file()]
        except OSError:
            return []
        return sorted(found, key=_mtime)

    def prune(self, limit: int) -> int:
        """Delete the least recently used files until the folder holds at most ``limit`` bytes;
        the number of files deleted."""
        files = self.files()
        sizes = [_size(p) for p in files]
        total, removed = sum(sizes), 0
        for path, size in zip(files, sizes, strict=True):
            if total <= limit:
                break
            path.unlink(missing_ok=True)
            total -= size
            removed += 1
        return removed

    def info(self) -> dict[str, Any]:
        """Where the cache is, how many files, scores and bytes it holds, and its bound."""
        files = self.files()
        entries = sum(len(self._read(p)) for p in files)
        return {"folder": str(self.folder), "files": len(files), "scores": entries,
                "bytes": sum(_size(p) for p in files), "max_bytes": max_bytes(),
                "enabled": cache_enabled()}

    def clear(self) -> int:
        """Delete every cache file; the number deleted."""
        files = self.files()
        for path in files:
            path.unlink(missing_ok=True)
        return len(files)


def _valid_entry(value: object) -> bool:
    return (isinstance(value, list) and len(value) == 3 and type(value[0]) is int
            and type(value[1]) is int and isinstance(value[2], (int, float)))


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def score_texts_cached(ref: str, texts: Sequence[str], *, device: str = "cpu", dtype: str | None = "float32",
                       context: int | None = None, stride: int | None = None, batch_size: int = 8,
                       use_cache: bool = True, desc: str | None = None,
                       load: Callable[[], LoadedLM] | None = None) -> list[TextScore]:
    """:func:`fusekit.lm.score.score_texts` of model ``ref`` on ``texts``, through the score cache.

    The model is loaded only when some text has no cached score, and only those texts are scored;
    the new scores are saved for the next run.

    Args:
        ref: a model reference, as in a recipe's ``model:`` (``base+adapter`` too).
        texts: the texts (each non-empty); equal texts are scored once.
        device: where the model runs (``cpu``, ``cuda``, ``auto``).
        dtype: the load dtype (see :func:`fusekit.lm.load.load_lm`).
        context: longest window in tokens (default: the model's, at most 1024).
        stride: how far each further window moves (default ``context // 2``).
        batch_size: windows per forward pass.
        use_cache: False scores everything and saves nothing (``--no-cache``).
        desc: what the progress bar says while scoring.
        load: returns ``ref`` already loaded (e.g. on a base shared with other adapters), called only
            when some text must be scored; None loads ``ref`` with ``load_lm`` and releases it after.

    Returns:
        One :class:`~fusekit.lm.score.TextScore` per text, in order.

    Raises:
        FusekitError: the model cannot be found or loaded, a text is empty, or context/stride
            are invalid.
    """
    from fusekit.device import resolve_device
    from fusekit.io.refs import resolve_model

    for index, text in enumerate(texts):
        if not text:
            raise FusekitError(f"text {index} is empty; there is nothing to score")
    digests = [text_digest(t) for t in texts]
    enabled = cache_enabled(use_cache)
    cache = ScoreCache()
    key = None
    found: dict[str, TextScore] = {}
    if enabled:
        key = ScoreKey(model_digest(resolve_model(ref)), context, stride, dtype, resolve_device(device).type)
        found = cache.get(key, digests)
    missing = {d: t for d, t in zip(digests, texts, strict=True) if d not in found}
    if missing:
        new = _score_now(ref, list(missing.values()), device=device, dtype=dtype, context=context,
                         stride=stride, batch_size=batch_size, desc=desc, load=load)
        fresh = dict(zip(missing, new, strict=True))
        if key is not None:
            cache.put(key, fresh, ref=ref)
        found.update(fresh)
    log.debug("%s: %d of %d scores from the cache", ref, len(texts) - len(missing), len(texts))
    return [TextScore(found[d].n_bytes, found[d].n_tokens, found[d].nll_nats) for d in digests]


def _score_now(ref: str, texts: list[str], *, device: str, dtype: str | None, context: int | None,
               stride: int | None, batch_size: int, desc: str | None,
               load: Callable[[], LoadedLM] | None = None) -> list[TextScore]:
    """Load ``ref`` (or take it from ``load``) and score ``texts``; a model loaded here is released
    before returning."""
    import gc

    from fusekit.lm.load import load_lm
    from fusekit.lm.score import score_texts

    lm = load() if load is not None else load_lm(ref, device=device, dtype=dtype)
    try:
        return score_texts(lm, texts, context=context, stride=stride, batch_size=batch_size, desc=desc)
    finally:
        del lm
        gc.collect()
