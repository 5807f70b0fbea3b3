"""``fusekit.lock``: what an output was built from, so a rebuild can be skipped, pinned or checked.

Every merge writes ``OUT_DIR/fusekit.lock`` (JSON) holding the fusekit, torch, safetensors and
huggingface_hub versions, the recipe's sha256, the options that change the bytes written, the random
seed of a stochastic method (a deterministic one records none), every input file's size and sha256
(for Hub inputs, the resolved commit and each file's size),
and the size and sha256 of every output file. No token, absolute path or timestamp is recorded, so the
same inputs give the same lock: a model the recipe names by absolute path is recorded relative to
the recipe's folder (:func:`portable_refs`).

Input files are hashed on a thread pool while the merge runs (:class:`InputFingerprints`), or their
digests taken from a stat-keyed cache when unchanged (:mod:`fusekit.io.digests`; ``--locked``
re-hashes every byte); the lock is compared field by field (:func:`stale_reason`) to decide whether
an output is up to date and whether ``--locked`` may proceed. :func:`verify_output` re-hashes a
finished output against its lock and notices files added to it (``push`` runs it first).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from fusekit.errors import CheckpointError, FusekitError, LockMismatchError
from fusekit.io.digests import DigestCache
from fusekit.io.files import file_sha256, write_text
from fusekit.io.refs import SAFETENSORS_INDEX, ResolvedModel, hub_repo_id
from fusekit.io.tokenizer import GENERATION_CONFIG, TOKENIZER_FILES
from fusekit.io.userfiles import read_user_text
from fusekit.lora.config import ADAPTER_CONFIG
from fusekit.version import __version__

LOCK_FILE = "fusekit.lock"
LOCK_VERSION = 1
MAX_LOCK_BYTES = 16 * 2**20
# Files of an input model whose content reaches the output (besides the weights).
SIDE_INPUTS = ("config.json", GENERATION_CONFIG, SAFETENSORS_INDEX, *TOKENIZER_FILES)
ADAPTER_PREFIX = "adapter/"  # how a lock names an applied adapter's files


@functools.cache
def source_digest() -> str:
    """sha256 over fusekit's own Python files: changes with the code even when the version does
    not (a development checkout), so an output built by other code is never "up to date"."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def library_versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour decides the output bytes (fusekit's with a digest
    of its source)."""
    found = {"fusekit": __version__, "fusekit_source": source_digest()}
    for name in ("torch", "safetensors", "huggingface_hub"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "absent"
    return found


def recipe_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def model_files(model: ResolvedModel) -> dict[str, Path]:
    """Every file of ``model`` a merge reads, by its name relative to the model folder; a LoRA
    adapter's config and weights as ``adapter/<name>``."""
    files: dict[str, Path] = {}
    for path in model.weight_files:
        files[_relative(path, model.folder)] = path
    for name in SIDE_INPUTS:
        path = model.folder / name
        if path.is_file():
            files[name] = path
    files.update(adapter_files(model))
    return dict(sorted(files.items()))


def adapter_files(model: ResolvedModel) -> dict[str, Path]:
    """``model``'s LoRA adapter files (config and weights) as ``adapter/<name>`` → path; {} without one."""
    adapter = model.adapter
    if adapter is None:
        return {}
    return {f"{ADAPTER_PREFIX}{ADAPTER_CONFIG}": adapter.folder / ADAPTER_CONFIG,
            f"{ADAPTER_PREFIX}{adapter.weights.name}": adapter.weights}


def _hashed_files(model: ResolvedModel) -> dict[str, Path]:
    """The files whose content a lock hashes: all of a local model's; of a Hub model (its commit
    names its content) only a local adapter's."""
    if model.hub_id is None:
        return model_files(model)
    if model.adapter is None or model.adapter.hub_id is not None:
        return {}
    return adapter_files(model)


def _relative(path: Path, folder: Path) -> str:
    try:
        return path.relative_to(folder).as_posix()
    except ValueError:
        return path.name


def portable_refs(refs: Iterable[str], recipe_dir: Path) -> dict[str, str]:
    """ref → how locks and model cards name it: a local path written absolute (or with ``~``) becomes
    relative to ``recipe_dir``; other references stay as written.

    Example:
        >>> portable_refs(["/data/models/a", "org/b"], Path("/data/recipes"))
        {'/data/models/a': '../models/a', 'org/b': 'org/b'}
    """
    names: dict[str, str] = {}
    for ref in refs:
        path = Path(ref).expanduser()
        name = ref
        if hub_repo_id(ref) is None and path.is_absolute():
            name = Path(os.path.relpath(path, recipe_dir.absolute())).as_posix()
        while name in names.values():  # an absolute and a relative spelling of one folder
            name = f"{name} ({len(names)})"
        names[ref] = name
    return names


def input_layout(models: Mapping[str, ResolvedModel]) -> list[list[Any]]:
    """(ref, file, size) of every input file: cheap, for recognising a run to resume (the content is
    compared by digest, see :func:`fusekit.io.journal.find_resumable`; a modification time is not
    evidence either way)."""
    rows: list[list[Any]] = []
    for ref, model in sorted(models.items()):
        for name, path in model_files(model).items():
            try:
                rows.append([ref, name, path.stat().st_size])
            except OSError as exc:
                raise CheckpointError(f"model '{ref}': cannot read {path} ({exc.strerror or exc})") from None
    return rows


class InputFingerprints:
    """Sizes and sha256 digests of every input file, computed on worker threads.

    Hub inputs are identified by their resolved commit and file sizes; they are not hashed (the
    commit already names their content). Digests of unchanged local files come from the
    :class:`~fusekit.io.digests.DigestCache` unless ``rehash``. ``result()`` waits for the digests.

    Args:
        models: ref → resolved model.
        workers: hashing threads (default: up to 4).
        rehash: hash every byte, trusting no cached digest (``--locked``, ``--resume``).
        names: ref → the name the result uses for it (see :func:`portable_refs`); default the ref.
    """

    def __init__(self, models: Mapping[str, ResolvedModel], *, workers: int | None = None,
                 rehash: bool = False, names: Mapping[str, str] | None = None) -> None:
        self._models = dict(sorted(models.items()))
        self._names = dict(names or {})
        self._cache = DigestCache(rehash=rehash)
        self._pool = ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1),
                                        thread_name_prefix="fusekit-hash")
        self._futures: dict[tuple[str, str], Future[str]] = {}
        for ref, model in self._models.items():
            for name, path in _hashed_files(model).items():
                self._futures[(ref, name)] = self._pool.submit(self._cache.digest, path)
        self._pool.shutdown(wait=False)
        self._result: dict[str, dict[str, Any]] | None = None
        self._lock = threading.Lock()

    def result(self) -> dict[str, dict[str, Any]]:
        """name → ``{"hub_id", "revision", "files": {file: {"size", "sha256"}}}``.

        Raises:
            CheckpointError: an input file vanished or cannot be read (one line naming it).
        """
        with self._lock:
            if self._result is None:
                inputs = {self._names.get(ref, ref): self._entry(ref, model)
                          for ref, model in self._models.items()}
                self._result = dict(sorted(inputs.items()))
                self._cache.save()
            return self._result

    def _entry(self, ref: str, model: ResolvedModel) -> dict[str, Any]:
        entry: dict[str, Any] = {}
        if model.hub_id is not None:
            entry = {"hub_id": model.hub_id, "revision": model.revision}
        adapter = model.adapter
        if adapter is not None and adapter.hub_id is not None:
            entry["adapter"] = {"hub_id": adapter.hub_id, "revision": adapter.revision}
        files: dict[str, dict[str, Any]] = {}
        for name, path in model_files(model).items():
            try:
                row: dict[str, Any] = {"size": path.stat().st_size}
                future = self._futures.get((ref, name))
                if future is not None:
                    row["sha256"] = future.result()
            except OSError as exc:
                raise CheckpointError(f"model '{ref}': cannot read {path} ({exc.strerror or exc}); "
                                      "was it moved or deleted during the run?") from None
            files[name] = row
        entry["files"] = files
        return entry

    @property
    def names(self) -> dict[str, str]:
        """ref → the name :meth:`result` gives it."""
        return {ref: self._names.get(ref, ref) for ref in self._models}

    def done(self) -> bool:
        """True once every digest is computed (``result()`` would not wait)."""
        return all(future.done() for future in self._futures.values())

    def cancel(self) -> None:
        for future in self._futures.values():
            future.cancel()


def output_files(folder: Path, exclude: Iterable[str] = ()) -> dict[str, dict[str, Any]]:
    """name → size and sha256 of every file in an output folder, but the lock and ``exclude``."""
    skip = {LOCK_FILE, *exclude}
    rows = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in skip:
            rows[path.name] = {"size": path.stat().st_size, "sha256": file_sha256(path)}
    return rows


def make_lock(*, recipe_text: str, recipe_name: str, options: Mapping[str, Any], seed: int | None,
              inputs: Mapping[str, Any], outputs: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The lock's content (``outputs`` filled in once the output is written); ``seed`` None (a
    deterministic method) records no ``random_seed``."""
    return {
        "lock_version": LOCK_VERSION,
        "versions": library_versions(),
        "recipe": {"name": recipe_name, "sha256": recipe_sha256(recipe_text)},
        "options": dict(options),
        **({} if seed is None else {"random_seed": seed}),
        "inputs": dict(inputs),
        "outputs": dict(outputs or {}),
    }


def lock_seed(path: Path) -> int | None:
    """The random seed the lock at ``path`` records; None when it records none (a deterministic
    method).

    Raises:
        LockMismatchError: the lock is missing or unreadable (one line).
    """
    seed = read_lock(path).get("random_seed")
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


def write_lock(folder: Path, lock: Mapping[str, Any]) -> None:
    write_text(folder / LOCK_FILE, json.dumps(lock, indent=2, sort_keys=True) + "\n")


def read_lock(path: Path) -> dict[str, Any]:
    """A lock file's content; a one-line :class:`LockMismatchError` when it is unreadable."""
    try:
        if path.stat().st_size > MAX_LOCK_BYTES:
            raise LockMismatchError(f"{path}: larger than {MAX_LOCK_BYTES // 2**20} MiB; not a "
                                    "fusekit lock file")
        lock = json.loads(read_user_text(path, what="lock file", limit=MAX_LOCK_BYTES))
    except FileNotFoundError:
        raise LockMismatchError(f"{path}: lock file not found; run the merge once without "
                                "--locked to create it, or pass --lock-file") from None
    except (OSError, ValueError, RecursionError):
        raise LockMismatchError(f"{path}: not a readable fusekit lock file (expected JSON); "
                                "delete it and merge again without --locked") from None
    valid = (isinstance(lock, dict) and lock.get("lock_version") == LOCK_VERSION
             and isinstance(lock.get("inputs"), dict) and isinstance(lock.get("outputs"), dict))
    if not valid:
        raise LockMismatchError(f"{path}: not a fusekit lock file of version {LOCK_VERSION}; "
                                "merge again without --locked to rewrite it")
    return lock


def input_differences(locked: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """How the inputs a recipe resolves to now differ from a lock's (empty: identical)."""
    found = []
    for ref, entry in current.items():
        old = locked.get(ref)
        if not isinstance(old, dict):
            found.append(f"model '{ref}' is not in the lock")
            continue
        if entry.get("revision") != old.get("revision"):
            found.append(f"model '{ref}' resolves to commit {entry.get('revision')} but the lock "
                         f"has {old.get('revision')}")
            continue
        if entry.get("adapter") != old.get("adapter"):
            found.append(f"model '{ref}': its adapter resolves to {entry.get('adapter')} but the lock has "
                         f"{old.get('adapter')}")
            continue
        files, old_files = entry.get("files", {}), old.get("files", {})
        if not isinstance(old_files, dict):
            old_files = {}
        for name in sorted(set(files) | set(old_files)):
            if name not in old_files:
                found.append(f"model '{ref}': {name} is new since the lock was written")
            elif name not in files:
                found.append(f"model '{ref}': {name} is gone since the lock was written")
            elif files[name] != old_files[name]:
                found.append(f"model '{ref}': {name} changed since the lock was written "
                             "(different size or sha256)")
    return found


def check_locked(lock_path: Path, current_inputs: Mapping[str, Any]) -> None:
    """``--locked``: raise :class:`LockMismatchError` naming the first input that differs."""
    lock = read_lock(lock_path)
    differences = input_differences(lock["inputs"], current_inputs)
    if differences:
        more = f" (and {len(differences) - 1} more)" if len(differences) > 1 else ""
        raise LockMismatchError(f"--locked: {differences[0]}{more}; {lock_path} pins the inputs — "
                                "restore them, or merge without --locked to update the lock")


def stale_reason(old: Mapping[str, Any], new: Mapping[str, Any], folder: Path, *,
                 rehash: bool = False) -> str | None:
    """Why the output in ``folder`` (locked by ``old``) does not match ``new``; None: up to date.

    ``new`` is a lock without outputs; the output files are checked against ``old``'s digests (every
    byte re-hashed when ``rehash``), so a shard changed, removed or added by hand is noticed.
    """
    if old.get("versions") != new["versions"]:
        return "the fusekit, torch, safetensors or huggingface_hub version changed"
    recipe = old.get("recipe")
    if not isinstance(recipe, dict) or recipe.get("sha256") != new["recipe"]["sha256"]:
        return "the recipe changed"
    if old.get("options") != new["options"]:
        return "the output options changed"
    if old.get("random_seed") != new.get("random_seed"):
        return "the random seed differs"
    differences = input_differences(old.get("inputs", {}), new["inputs"])
    if differences or set(old.get("inputs", {})) != set(new["inputs"]):
        return differences[0] if differences else "the recipe's models changed"
    return verify_outputs(old, folder, rehash=rehash)


def verify_outputs(lock: Mapping[str, Any], folder: Path, *, rehash: bool = True) -> str | None:
    """Why the files in ``folder`` differ from those ``lock`` records; None when all match.

    Every recorded file must be there with its size and sha256 (re-hashed byte by byte unless
    ``rehash`` is False, when the ctime-keyed digest cache may answer), and nothing else may be:
    an added file or folder (a stray shard would be pushed and may be loaded) is a difference.
    Hidden entries and the lock itself are not part of an output.
    """
    outputs = lock.get("outputs")
    if not isinstance(outputs, dict) or not outputs:
        return "the lock lists no output files"
    extra = sorted(p.name for p in folder.iterdir()
                   if p.name not in outputs and p.name != LOCK_FILE and not p.name.startswith("."))
    if extra:
        return f"{extra[0]} was added to the output folder after the lock was written"
    cache = DigestCache(rehash=rehash)
    try:
        for name, row in sorted(outputs.items()):
            path = folder / name
            if (Path(name).name != name or not isinstance(row, dict) or not path.is_file()
                    or path.stat().st_size != row.get("size")
                    or cache.digest(path) != row.get("sha256")):
                return f"output file {name} is missing or was modified"
    finally:
        cache.save()
    return None


def verify_output(out_dir: str | Path) -> None:
    """Re-hash every file of a finished output against its ``fusekit.lock`` (run before ``push``).

    Raises:
        FusekitError: one line naming the first file that is missing, modified or added, or
            :class:`LockMismatchError` when the lock is missing or unreadable.

    Example:
        >>> verify_output("./merged")  # doctest: +SKIP
    """
    folder = Path(out_dir)
    lock = read_lock(folder / LOCK_FILE)
    changed = verify_outputs(lock, folder, rehash=True)
    if changed is not None:
        raise FusekitError(f"'{folder}': {changed} ({LOCK_FILE} records other content); build it "
                           "again (--overwrite) before using or pushing it")


def seal_output(folder: Path, *, kind: str, recipe_text: str | None = None,
                recipe_name: str | None = None) -> None:
    """Write a ``fusekit.lock`` recording ``folder``'s files, for outputs other than merges (``moe``).

    It marks the folder as a fusekit output (so ``--overwrite`` may replace it later) and lets
    :func:`verify_output` and ``push`` notice files changed or added since.
    """
    lock: dict[str, Any] = {"lock_version": LOCK_VERSION, "kind": kind, "versions": library_versions(),
                            "inputs": {}, "outputs": output_files(folder)}
    if recipe_text is not None:
        lock["recipe"] = {"name": recipe_name or "", "sha256": recipe_sha256(recipe_text)}
    write_lock(folder, lock)
