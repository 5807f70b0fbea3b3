"""``fusekit.merge`` and ``fusekit.plan_merge``: the library entry points behind the CLI commands."""

from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fusekit.device import resolve_device
from fusekit.errors import LockMismatchError, NonFiniteError, OutputExistsError
from fusekit.io.card import model_card
from fusekit.io.journal import JOURNAL_FILE, Journal, OutputGuard, find_resumable, run_key
from fusekit.io.layout import TensorSpec
from fusekit.io.lock import (
    LOCK_FILE,
    InputFingerprints,
    check_locked,
    library_versions,
    make_lock,
    output_files,
    read_lock,
    recipe_sha256,
    stale_reason,
    stat_fingerprint,
    write_lock,
)
from fusekit.io.reader import CheckpointReader
from fusekit.io.tokenizer import copy_generation_config, copy_tokenizer, write_chat_template
from fusekit.io.writer import (
    atomic_output,
    check_output_folder,
    is_finite,
    partial_folders,
    partial_owner,
    write_json,
    write_text,
)
from fusekit.ops import get_method
from fusekit.plan import ExecutionStats, Executor, Plan, build_plan
from fusekit.plan.executor import peak_rss_bytes
from fusekit.recipe import MergeRecipe, load_merge_recipe
from fusekit.recipe.load import read_recipe_text

DEFAULT_SHARD_BYTES = 5 * 10**9
DEFAULT_MAX_MEMORY = 10**9
log = logging.getLogger("fusekit")
RECIPE_COPY = "mergekit_config.yml"  # the name Hub tooling looks for, so merges are recognised


@dataclass(frozen=True)
class MergeResult:
    """The written output folder and what the run measured.

    ``up_to_date`` is True when the output already matched its lock and nothing was recomputed;
    ``kept_shards`` counts the shards a ``resume`` took over from an interrupted run.
    """

    out_dir: Path
    plan: Plan
    stats: ExecutionStats
    seed: int
    up_to_date: bool = False
    kept_shards: int = 0


def plan_merge(recipe: str | Path, *, allow_pickle: bool = False) -> Plan:
    """Validate ``recipe`` and plan every output tensor, reading headers and configs only."""
    path = Path(recipe)
    parsed, _ = load_merge_recipe(path)
    return build_plan(parsed, recipe_text=read_recipe_text(path), allow_pickle=allow_pickle)


def merge(recipe: str | Path, out_dir: str | Path, *, overwrite: bool = False,
          out_shard_size: int | None = DEFAULT_SHARD_BYTES, device: str = "cpu",
          allow_pickle: bool = False, copy_tokenizer_files: bool = True,
          random_seed: int | None = None, max_memory: int | None = DEFAULT_MAX_MEMORY,
          pipelined: bool = True, progress: bool = False, force: bool = False, resume: bool = False,
          locked: bool = False, lock_file: str | Path | None = None,
          allow_nonfinite: bool = False) -> MergeResult:
    """Merge the models a recipe names and write a transformers-loadable model to ``out_dir``.

    Args:
        recipe: path of a YAML merge recipe (mergekit's format).
        out_dir: output folder; it appears only once the merge is complete, with ``fusekit.lock``.
        overwrite: replace an existing non-empty ``out_dir`` (an up-to-date output is still kept).
        out_shard_size: largest shard in bytes (None: one file).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        allow_pickle: accept ``.bin``/``.pt`` inputs (loaded with ``weights_only=True``).
        copy_tokenizer_files: copy the tokenizer of ``tokenizer_source`` (default: the base).
        random_seed: seed for stochastic methods (DARE, DELLA, ...); None picks one, which is
            logged and written to the model card so the run can be repeated.
        max_memory: bound on the process's resident memory in bytes (None: one tensor at a
            time, unbounded); tensors of elementwise methods are split into row blocks to fit.
        pipelined: overlap reading, arithmetic and writing on separate threads (the sequential
            mode gives the same bytes).
        progress: show a progress bar on stderr.
        force: recompute even when ``out_dir``'s lock says it is up to date (implies overwrite).
        resume: continue an interrupted run from its verified shards, and keep this run's partial
            output if it is interrupted or the disk fills up.
        locked: refuse to run (:class:`~fusekit.errors.LockMismatchError`) when any input differs
            from the lock file.
        lock_file: the lock ``locked`` compares with (default: ``out_dir/fusekit.lock``).
        allow_nonfinite: write NaN/Inf values instead of stopping with an error naming the tensor.

    Example:
        >>> fusekit.merge("configs/linear.yaml", "./merged")  # doctest: +SKIP
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    existing_lock = out_dir / LOCK_FILE
    has_lock = existing_lock.is_file()
    overwrite = overwrite or force
    check_output_folder(out_dir, overwrite=overwrite or has_lock)
    merge_plan = plan_merge(recipe, allow_pickle=allow_pickle)
    fingerprints = InputFingerprints(merge_plan.models)
    try:
        if locked:
            check_locked(Path(lock_file) if lock_file is not None else existing_lock,
                         fingerprints.result())
        options = {"out_shard_size": out_shard_size, "copy_tokenizer": copy_tokenizer_files}
        lock_fields = {"recipe_text": merge_plan.recipe_text, "recipe_name": Path(recipe).name,
                       "options": options}
        if has_lock and not force:
            fresh = _up_to_date(existing_lock, out_dir, random_seed, fingerprints, lock_fields,
                                overwrite=overwrite)
            if fresh is not None:
                return MergeResult(out_dir=out_dir, plan=merge_plan, seed=fresh, up_to_date=True,
                                   stats=ExecutionStats(
                                       tensors=0, bytes_read=0, bytes_written=0,
                                       seconds=time.perf_counter() - started,
                                       peak_rss_bytes=peak_rss_bytes(),
                                       files=tuple(sorted(out_dir.glob("*.safetensors")))))
        return _run(merge_plan, out_dir, fingerprints, lock_fields, device=device,
                    out_shard_size=out_shard_size, copy_tokenizer_files=copy_tokenizer_files,
                    random_seed=random_seed, max_memory=max_memory, pipelined=pipelined,
                    progress=progress, resume=resume, allow_nonfinite=allow_nonfinite)
    finally:
        fingerprints.cancel()


def _up_to_date(lock_path: Path, out_dir: Path, random_seed: int | None,
                fingerprints: InputFingerprints, lock_fields: dict[str, Any], *,
                overwrite: bool) -> int | None:
    """The locked seed when ``out_dir`` matches its lock; else None (or an error without
    ``overwrite``, so a stale output is never replaced unasked)."""
    try:
        old = read_lock(lock_path)
    except LockMismatchError:
        old, reason = None, f"{LOCK_FILE} is unreadable"
    if old is not None:
        seed = random_seed if random_seed is not None else old.get("random_seed")
        if not isinstance(seed, int):
            reason = "the lock has no random seed"
        else:
            wanted = make_lock(seed=seed, inputs=fingerprints.result(), **lock_fields)
            reason = stale_reason(old, wanted, out_dir) or ""
            if not reason:
                return seed
    if not overwrite:
        raise OutputExistsError(f"output folder '{out_dir}' is out of date ({reason}); pass "
                                "--overwrite to rebuild it")
    log.warning("%s is out of date (%s); rebuilding it", out_dir, reason)
    return None


def _run(merge_plan: Plan, out_dir: Path, fingerprints: InputFingerprints,
         lock_fields: dict[str, Any], *, device: str, out_shard_size: int | None,
         copy_tokenizer_files: bool, random_seed: int | None, max_memory: int | None,
         pipelined: bool, progress: bool, resume: bool, allow_nonfinite: bool) -> MergeResult:
    """Merge into a partial folder (a resumed one, or new), then write side files and the lock."""
    specs = [TensorSpec(t.output, t.shape, t.out_dtype) for t in merge_plan.tasks]
    key = run_key({"recipe": recipe_sha256(merge_plan.recipe_text), "options": lock_fields["options"],
                   "inputs": stat_fingerprint(merge_plan.models), "versions": library_versions(),
                   "layout": [[s.name, list(s.shape), str(s.dtype)] for s in specs]})
    found = find_resumable(out_dir, key=key, seed=random_seed) if resume else None
    if found is not None:
        seed = found.seed
        log.warning("resuming from %s: %d of %d journaled shards verified and kept",
                    found.folder.name, len(found.keep), found.journaled)
    else:
        seed = pick_seed(random_seed, stochastic=get_method(merge_plan.recipe.merge_method).stochastic)
        left = [p for p in partial_folders(out_dir) if partial_owner(p) is None]
        if left and not resume:
            log.warning("an interrupted run left %s; pass --resume to continue it, or delete it",
                        left[0])
    guard = OutputGuard(specs, out_shard_size, keep=found.keep if found else {},
                        check_finite=not allow_nonfinite)
    executor = Executor(merge_plan, device=resolve_device(device), max_shard_bytes=out_shard_size,
                        seed=seed, max_memory=max_memory, pipelined=pipelined, progress=progress,
                        guard=guard)
    try:
        with atomic_output(out_dir, overwrite=True, reuse=found.folder if found else None,
                           keep_partial=resume,
                           before_rename=lambda temp: (temp / JOURNAL_FILE).unlink(missing_ok=True)
                           ) as temp:
            guard.journal = Journal(temp, key=key, seed=seed, fresh=found is None)
            stats = executor.run(temp)
            write_side_files(merge_plan, temp, name=out_dir.name, tokenizer=copy_tokenizer_files,
                             seed=seed)
            write_lock(temp, make_lock(seed=seed, inputs=fingerprints.result(),
                                       outputs=_output_digests(temp, guard), **lock_fields))
    except NonFiniteError as exc:
        raise _name_nonfinite_input(merge_plan, exc) from None
    stats = replace(stats, files=tuple(out_dir / f.name for f in stats.files))
    return MergeResult(out_dir=out_dir, plan=merge_plan, stats=stats, seed=seed,
                       kept_shards=len(found.keep) if found else 0)


def _output_digests(folder: Path, guard: OutputGuard) -> dict[str, dict[str, Any]]:
    """Size and sha256 of every output file: shards from the writer's running digests, the small
    side files hashed here."""
    writer = guard.writer
    known = {} if writer is None else {name: {"size": writer.sizes[name], "sha256": digest}
                                       for name, digest in writer.hashes.items()}
    others = output_files(folder, exclude={JOURNAL_FILE, *known})
    return dict(sorted({**known, **others}.items()))


def _name_nonfinite_input(merge_plan: Plan, exc: NonFiniteError) -> NonFiniteError:
    """Point at the input tensor holding NaN/Inf when one does (the merge itself may make them)."""
    task = next((t for t in merge_plan.tasks if t.output == exc.tensor), None)
    if task is None:
        return exc
    for tensor_input in task.all_inputs:
        with CheckpointReader(merge_plan.models[tensor_input.model]) as reader:
            value = reader.get(tensor_input.name)
        if value.is_floating_point() and not is_finite(value):
            return NonFiniteError(
                f"tensor '{tensor_input.name}' of model '{tensor_input.model}' holds NaN or infinity "
                f"(it feeds output tensor '{task.output}'); repair or replace that checkpoint, or "
                "pass --allow-nonfinite to merge it anyway", task.output)
    return exc


def pick_seed(seed: int | None, *, stochastic: bool) -> int:
    """``seed`` itself, or a fresh one (logged when the method draws random numbers)."""
    if seed is not None:
        return seed
    chosen = secrets.randbelow(2**31)
    if stochastic:
        log.warning("random seed %d (pass --random-seed %d to repeat this merge)", chosen, chosen)
    return chosen


def write_side_files(merge_plan: Plan, out: Path, *, name: str, tokenizer: bool = True,
                     seed: int = 0) -> None:
    """config.json, generation config, tokenizer, model card and the recipe, beside the weights."""
    write_json(out / "config.json", merge_plan.out_config)
    donor = merge_plan.models[merge_plan.donor]
    copy_generation_config(donor, out)
    if tokenizer and merge_plan.tokenizer_source is not None:
        copy_tokenizer(merge_plan.tokenizer_source, out)
        if merge_plan.chat_template is not None:
            write_chat_template(out, merge_plan.chat_template)
    recipe: MergeRecipe = merge_plan.recipe
    write_text(out / "README.md", model_card(
        name=name, method=recipe.merge_method, models=list(merge_plan.models),
        base=recipe.base_model, recipe_text=merge_plan.recipe_text, seed=seed))
    write_text(out / RECIPE_COPY, merge_plan.recipe_text)
