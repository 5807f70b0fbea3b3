"""``fusekit.merge`` and ``fusekit.plan_merge``: the library entry points behind the CLI commands."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fusekit.device import resolve_device
from fusekit.errors import (
    CheckpointError,
    FusekitError,
    LockMismatchError,
    NonFiniteError,
    OutputExistsError,
)
from fusekit.io.card import model_card
from fusekit.io.files import write_json, write_text
from fusekit.io.journal import (
    JOURNAL_FILE,
    Journal,
    OutputGuard,
    Resumable,
    find_resumable,
    inputs_digest,
    run_key,
)
from fusekit.io.layout import TensorSpec
from fusekit.io.lock import (
    LOCK_FILE,
    InputFingerprints,
    check_locked,
    input_layout,
    library_versions,
    make_lock,
    output_files,
    portable_refs,
    read_lock,
    recipe_sha256,
    stale_reason,
    write_lock,
)
from fusekit.io.outputs import claim_output, model_inputs
from fusekit.io.reader import CheckpointReader
from fusekit.io.tokenizer import copy_generation_config, copy_tokenizer, write_chat_template
from fusekit.io.writer import (
    atomic_output,
    check_output_folder,
    check_output_location,
    is_finite,
    partial_folders,
    partial_owner,
)
from fusekit.ops import get_method
from fusekit.plan import ExecutionStats, Executor, Plan, build_plan
from fusekit.plan.memory import peak_rss_bytes
from fusekit.recipe import MergeRecipe, load_merge_recipe, parse_merge_recipe
from fusekit.recipe.load import read_recipe_text
from fusekit.recipe.numbers import check_option, check_seed

DEFAULT_SHARD_BYTES = 5 * 10**9
DEFAULT_MAX_MEMORY = 10**9
log = logging.getLogger("fusekit")
RECIPE_COPY = "mergekit_config.yml"  # the name Hub tooling looks for, so merges are recognised


@dataclass(frozen=True)
class MergeResult:
    """The written output folder and what the run measured (what :func:`merge` returns).

    Attributes:
        out_dir: the output folder.
        plan: the plan that was run: one task per output tensor.
        stats: tensors, bytes read and written, seconds, peak resident memory, shard files.
        seed: the random seed the merge used (also in the model card and ``fusekit.lock``).
        up_to_date: True when the output already matched its lock and nothing was recomputed.
        kept_shards: the shards a ``resume`` took over from an interrupted run.
    """

    out_dir: Path
    plan: Plan
    stats: ExecutionStats
    seed: int
    up_to_date: bool = False
    kept_shards: int = 0


def plan_merge(recipe: str | Path | MergeRecipe, *, allow_pickle: bool = False) -> Plan:
    """Validate ``recipe`` and plan every output tensor, reading headers and configs only.

    Args:
        recipe: path of a YAML merge recipe, or a :class:`~fusekit.recipe.MergeRecipe` already
            parsed (its text is then :func:`recipe_yaml`'s dump of it).
        allow_pickle: accept ``.bin``/``.pt`` inputs.

    Returns:
        The :class:`~fusekit.plan.Plan`: one task per output tensor, with the resolved models.

    Raises:
        RecipeError: the recipe is invalid (one line naming the file, line and key).
        CheckpointNotFoundError: a model it names cannot be found.

    Example:
        >>> len(fusekit.plan_merge("configs/linear.yaml").tasks)  # doctest: +SKIP
        39
    """
    parsed, text = _read_recipe(recipe)
    return build_plan(parsed, recipe_text=text, allow_pickle=allow_pickle)


def recipe_yaml(recipe: MergeRecipe) -> str:
    """``recipe`` as mergekit-style YAML text that loads back to an equal recipe.

    Example:
        >>> from fusekit.recipe.schema import ModelEntry
        >>> recipe_yaml(MergeRecipe(merge_method="linear", models=[ModelEntry(model="a")]))
        'merge_method: linear\\nmodels:\\n- model: a\\n'
    """
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _read_recipe(recipe: str | Path | MergeRecipe) -> tuple[MergeRecipe, str]:
    """The parsed recipe and its text: a file's own text, or a parsed recipe's YAML dump (parsed
    again, so it passes the same checks as a recipe file)."""
    if isinstance(recipe, MergeRecipe):
        return parse_merge_recipe(recipe_yaml(recipe), _recipe_name(recipe))[0], recipe_yaml(recipe)
    path = Path(recipe)
    return load_merge_recipe(path)[0], read_recipe_text(path)


def _recipe_name(recipe: str | Path | MergeRecipe) -> str:
    """The name the lock records for ``recipe``: a file's name, or ``<MergeRecipe>``."""
    return "<MergeRecipe>" if isinstance(recipe, MergeRecipe) else Path(recipe).name


def merge(recipe: str | Path | MergeRecipe, out_dir: str | Path, *, overwrite: bool = False,
          out_shard_size: int | None = DEFAULT_SHARD_BYTES, device: str = "cpu",
          allow_pickle: bool = False, copy_tokenizer_files: bool = True,
          random_seed: int | None = None, max_memory: int | None = DEFAULT_MAX_MEMORY,
          pipelined: bool = True, progress: bool = False, force: bool = False, resume: bool = False,
          locked: bool = False, lock_file: str | Path | None = None,
          allow_nonfinite: bool = False) -> MergeResult:
    """Merge the models a recipe names and write a transformers-loadable model to ``out_dir``.

    Args:
        recipe: a YAML merge recipe's path (mergekit's format), or a parsed
            :class:`~fusekit.recipe.MergeRecipe` (its :func:`recipe_yaml` dump is written beside).
        out_dir: output folder; it appears only once the merge is complete, with ``fusekit.lock``.
        overwrite: replace an existing non-empty ``out_dir`` (an up-to-date output is still kept).
        out_shard_size: largest shard in bytes (None: one file).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        allow_pickle: accept ``.bin``/``.pt`` inputs (loaded with ``weights_only=True``).
        copy_tokenizer_files: copy the tokenizer of ``tokenizer_source`` (default: the base).
        random_seed: seed for stochastic methods (DARE, DELLA, ...); None picks one, which is
            logged and written to the model card so the run can be repeated.
        max_memory: bound on resident memory in bytes (None: unbounded); large tensors are
            merged in row blocks to fit.
        pipelined: overlap reading, arithmetic and writing (sequential gives the same bytes).
        progress: show a progress bar on stderr.
        force: recompute even when ``out_dir`` is up to date with its lock (implies overwrite).
        resume: continue an interrupted run from its verified shards; keep this run's partial
            output if it is interrupted or the disk fills up.
        locked: refuse to run (:class:`~fusekit.errors.LockMismatchError`) when any input differs
            from the lock file.
        lock_file: the lock ``locked`` compares with (default: ``out_dir/fusekit.lock``).
        allow_nonfinite: write NaN/Inf values instead of stopping with an error naming the tensor.

    Returns:
        The :class:`MergeResult` (``up_to_date`` when nothing had to be recomputed).

    Raises:
        FusekitError: a user mistake, one line: the recipe (:class:`~fusekit.errors.RecipeError`),
            an input, the output folder (:class:`~fusekit.errors.OutputExistsError`) or the lock.

    Example:
        >>> fusekit.merge("configs/linear.yaml", "./merged")  # doctest: +SKIP
    """
    started = time.perf_counter()
    overwrite = overwrite or force
    out_dir = _check_early(Path(out_dir), random_seed, overwrite=overwrite)
    merge_plan = plan_merge(recipe, allow_pickle=allow_pickle)
    lock_fields = {"recipe_text": merge_plan.recipe_text, "recipe_name": _recipe_name(recipe),
                   "options": {"out_shard_size": out_shard_size, "copy_tokenizer": copy_tokenizer_files}}
    with claim_output(out_dir, inputs=merge_inputs(merge_plan, recipe), overwrite=overwrite, update=True), \
            _fingerprints(merge_plan, recipe, rehash=locked or resume) as fingerprints:
        if locked:
            check_locked(Path(lock_file or out_dir / LOCK_FILE), fingerprints.result())
        fresh = None if force else _up_to_date(out_dir, random_seed, fingerprints, lock_fields,
                                               overwrite=overwrite, rehash=locked)
        if fresh is not None:
            return _up_to_date_result(merge_plan, out_dir, fresh, started)
        return _run(merge_plan, out_dir, fingerprints, lock_fields, device=device,
                    out_shard_size=out_shard_size, copy_tokenizer_files=copy_tokenizer_files,
                    random_seed=random_seed, max_memory=max_memory, pipelined=pipelined,
                    progress=progress, resume=resume, allow_nonfinite=allow_nonfinite)


def _check_early(out_dir: Path, random_seed: int | None, *, overwrite: bool) -> Path:
    """The checks that need no plan: the seed's range and the output folder's place and contents."""
    if random_seed is not None:
        check_option("--random-seed", check_seed, random_seed)
    check_output_location(out_dir)  # an unusable path is one line before anything stats it
    check_output_folder(out_dir, overwrite=overwrite or (out_dir / LOCK_FILE).is_file())
    return out_dir


@contextlib.contextmanager
def _fingerprints(merge_plan: Plan, recipe: str | Path | MergeRecipe, *,
                  rehash: bool) -> Iterator[InputFingerprints]:
    """The inputs' digests, computed in the background while the merge runs; cancelled after."""
    fingerprints = InputFingerprints(merge_plan.models, rehash=rehash,
                                     names=portable_refs(merge_plan.models, _recipe_dir(recipe)))
    try:
        yield fingerprints
    finally:
        fingerprints.cancel()


def _up_to_date_result(merge_plan: Plan, out_dir: Path, seed: int, started: float) -> MergeResult:
    """What :func:`merge` returns when the output already matched its lock: nothing was computed."""
    stats = ExecutionStats(tensors=0, bytes_read=0, bytes_written=0,
                           seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes(),
                           files=tuple(sorted(out_dir.glob("*.safetensors"))))
    return MergeResult(out_dir=out_dir, plan=merge_plan, seed=seed, up_to_date=True, stats=stats)


def merge_inputs(merge_plan: Plan, recipe: str | Path | MergeRecipe) -> list[tuple[str, Path]]:
    """What a merge reads, as (label, path) for :func:`~fusekit.io.outputs.claim_output`: the
    models, the tokenizer source and the recipe file."""
    models = [*merge_plan.models.values()]
    if merge_plan.tokenizer_source is not None:
        models.append(merge_plan.tokenizer_source)
    found = model_inputs(models)
    if not isinstance(recipe, MergeRecipe):
        found.append(("recipe", Path(recipe)))
    return found


def _recipe_dir(recipe: str | Path | MergeRecipe) -> Path:
    """The folder paths in the lock and card are relative to: the recipe's, or the current one."""
    return Path.cwd() if isinstance(recipe, MergeRecipe) else Path(recipe).absolute().parent


def _up_to_date(out_dir: Path, random_seed: int | None,
                fingerprints: InputFingerprints, lock_fields: dict[str, Any], *,
                overwrite: bool, rehash: bool = False) -> int | None:
    """The locked seed when ``out_dir`` has a lock and matches it; else None (or an error without
    ``overwrite``, so a stale output is never replaced unasked). ``rehash``: re-read every output
    byte rather than trust the digest cache (``--locked``)."""
    if not (out_dir / LOCK_FILE).is_file():
        return None
    try:
        old = read_lock(out_dir / LOCK_FILE)
    except LockMismatchError:
        old, reason = None, f"{LOCK_FILE} is unreadable"
    if old is not None:
        seed = random_seed if random_seed is not None else old.get("random_seed")
        if not isinstance(seed, int):
            reason = "the lock has no random seed"
        else:
            wanted = make_lock(seed=seed, inputs=fingerprints.result(), **lock_fields)
            reason = stale_reason(old, wanted, out_dir, rehash=rehash) or ""
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
                   "inputs": input_layout(merge_plan.models), "versions": library_versions(),
                   "layout": [[s.name, list(s.shape), str(s.dtype)] for s in specs]})
    found, seed = _resume_point(merge_plan, out_dir, key, fingerprints, random_seed, resume=resume)
    guard = OutputGuard(specs, out_shard_size, keep=found.keep if found else {},
                        check_finite=not allow_nonfinite)
    executor = Executor(merge_plan, device=resolve_device(device), max_shard_bytes=out_shard_size,
                        seed=seed, max_memory=max_memory, pipelined=pipelined, progress=progress,
                        guard=guard)
    try:
        with atomic_output(out_dir, overwrite=True, reuse=found.folder if found else None,
                           keep_partial=resume,
                           before_rename=lambda temp: (temp / JOURNAL_FILE).unlink(missing_ok=True)
                           ) as temp, _inputs_must_stay(merge_plan):
            guard.journal = Journal(temp, key=key, seed=seed, fresh=found is None,
                                    inputs=None if found else _inputs_when_hashed(fingerprints))
            stats = executor.run(temp)
            write_side_files(merge_plan, temp, name=out_dir.name, tokenizer=copy_tokenizer_files,
                             seed=seed, names=fingerprints.names)
            write_lock(temp, make_lock(seed=seed, inputs=fingerprints.result(),
                                       outputs=_output_digests(temp, guard), **lock_fields))
    except NonFiniteError as exc:
        named = _name_nonfinite_input(merge_plan, exc)
        if named is exc:
            raise
        raise named from exc
    stats = replace(stats, files=tuple(out_dir / f.name for f in stats.files))
    return MergeResult(out_dir=out_dir, plan=merge_plan, stats=stats, seed=seed,
                       kept_shards=len(found.keep) if found else 0)


def _resume_point(merge_plan: Plan, out_dir: Path, key: str, fingerprints: InputFingerprints,
                  random_seed: int | None, *, resume: bool) -> tuple[Resumable | None, int]:
    """The interrupted run to continue (``resume``: its inputs verified by content) and the seed."""
    found = None
    if resume:
        found = find_resumable(out_dir, key=key, seed=random_seed,
                               inputs=inputs_digest(fingerprints.result()))
    if found is not None:
        log.warning("resuming from %s: %d of %d journaled shards verified and kept",
                    found.folder.name, len(found.keep), found.journaled)
        return found, found.seed
    left = [p for p in partial_folders(out_dir) if partial_owner(p) is None]
    if left and not resume:
        log.warning("an interrupted run left %s; pass --resume to continue it, or delete it", left[0])
    return None, pick_seed(random_seed, stochastic=get_method(merge_plan.recipe.merge_method).stochastic)


def _inputs_when_hashed(fingerprints: InputFingerprints) -> Callable[[], str | None]:
    """For the journal: the inputs digest once every input is hashed, None before."""
    return lambda: inputs_digest(fingerprints.result()) if fingerprints.done() else None


@contextlib.contextmanager
def _inputs_must_stay(merge_plan: Plan) -> Iterator[None]:
    """Turn an OS error on an input file (deleted, moved, unreadable mid-run) into one line naming
    it; raised inside :func:`atomic_output`, it removes the partial output."""
    try:
        yield
    except OSError as exc:
        if isinstance(exc, FusekitError) or not exc.filename:
            raise
        failed = Path(os.fsdecode(exc.filename)).absolute()
        for ref, model in merge_plan.models.items():
            if failed == model.folder.absolute() or model.folder.absolute() in failed.parents:
                raise CheckpointError(f"model '{ref}': {failed} vanished or became unreadable while "
                                      f"the merge ran ({exc.strerror or exc}); the partial output "
                                      "was removed, restore the input and merge again") from None
        raise


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
                     seed: int = 0, names: Mapping[str, str] | None = None) -> None:
    """config.json, generation config, tokenizer, model card and the recipe, beside the weights.

    ``names`` (ref → name, :func:`~fusekit.io.lock.portable_refs`) keeps absolute paths out of the
    model card; the recipe copy stays byte for byte what the user wrote.
    """
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
        base=recipe.base_model, recipe_text=merge_plan.recipe_text, seed=seed, names=names))
    write_text(out / RECIPE_COPY, merge_plan.recipe_text)
