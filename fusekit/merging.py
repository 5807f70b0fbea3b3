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
    RecipeError,
)
from fusekit.io.card import RECIPE_COPY, model_card
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
    lock_seed,
    make_lock,
    output_files,
    portable_refs,
    read_lock,
    recipe_sha256,
    stale_reason,
    write_lock,
)
from fusekit.io.outputs import claim_output, model_inputs
from fusekit.io.reader import open_reader
from fusekit.io.tokenizer import copy_generation_config, copy_tokenizer, write_chat_template
from fusekit.io.writer import (
    atomic_output,
    check_output_folder,
    check_output_location,
    is_finite,
    partial_folders,
    partial_owner,
)
from fusekit.lora.adapter_recipe import is_adapter_output
from fusekit.ops import get_method
from fusekit.plan import ExecutionStats, Executor, Plan, build_plan
from fusekit.plan.memory import peak_rss_bytes
from fusekit.recipe import MergeRecipe, load_merge_recipe, parse_merge_recipe
from fusekit.recipe.load import read_recipe_text
from fusekit.recipe.numbers import check_option, check_seed
from fusekit.recipe.stages import StageRecipe, is_multistage
from fusekit.vocab import write_output_tokenizer

DEFAULT_SHARD_BYTES = 5 * 10**9
DEFAULT_MAX_MEMORY = 10**9
log = logging.getLogger("fusekit")


@dataclass(frozen=True)
class MergeResult:
    """The written output folder and what the run measured (what :func:`merge` returns).

    Attributes:
        out_dir: the output folder.
        plan: the plan that was run: one task per output tensor.
        stats: tensors, bytes read and written, seconds, peak resident memory, shard files.
        seed: the random seed of a stochastic method (also in the model card and ``fusekit.lock``);
            None for a deterministic one, whose output depends on no seed.
        up_to_date: True when the output already matched its lock and nothing was recomputed.
        kept_shards: the shards a ``resume`` took over from an interrupted run.
        stages: for a multi-stage recipe, (stage name, its result) of every stage built or found up
            to date, in build order; this result is the last one's.
    """

    out_dir: Path
    plan: Plan
    stats: ExecutionStats
    seed: int | None
    up_to_date: bool = False
    kept_shards: int = 0
    stages: tuple[tuple[str, MergeResult], ...] = ()


def plan_merge(recipe: str | Path | MergeRecipe | StageRecipe, *, allow_pickle: bool = False,
               allow_crimes: bool = False, strict: bool = False) -> Plan:
    """Validate ``recipe`` and plan every output tensor, reading headers and configs only.

    Args:
        recipe: path of a YAML merge recipe, or a :class:`~fusekit.recipe.MergeRecipe` already
            parsed (its text is then :func:`recipe_yaml`'s dump of it).
        allow_pickle: accept ``.bin``/``.pt`` inputs.
        allow_crimes: merge models whose ``model_type`` or ``architectures`` differ.
        strict: refuse recipe settings that have no effect (mergekit ignores them; by default they
            are logged as warnings naming their line).

    Returns:
        The :class:`~fusekit.plan.Plan`: one task per output tensor, with the resolved models.

    Raises:
        RecipeError: the recipe is invalid (one line naming the file, line and key).
        CheckpointNotFoundError: a model it names cannot be found.

    Example:
        >>> len(fusekit.plan_merge("configs/linear.yaml").tasks)  # doctest: +SKIP
        39
    """
    parsed, text = _read_recipe(recipe, strict=strict)
    if is_adapter_output(parsed):
        raise RecipeError(f"{_recipe_name(recipe)}: an 'output: adapter' recipe has no tensor plan (PEFT "
                          "combines the adapters); run fusekit merge to write the adapter")
    return build_plan(parsed, recipe_text=text, allow_pickle=allow_pickle, allow_crimes=allow_crimes)


def recipe_yaml(recipe: MergeRecipe) -> str:
    """``recipe`` as mergekit-style YAML text that loads back to an equal recipe.

    Example:
        >>> from fusekit.recipe.schema import ModelEntry
        >>> recipe_yaml(MergeRecipe(merge_method="linear", models=[ModelEntry(model="a")]))
        'merge_method: linear\\nmodels:\\n- model: a\\n'
    """
    import yaml

    return yaml.safe_dump(recipe.model_dump(mode="json", exclude_none=True), sort_keys=False)


def _read_recipe(recipe: str | Path | MergeRecipe | StageRecipe, *,
                 strict: bool = False) -> tuple[MergeRecipe, str]:
    """The parsed recipe and its text: a file's own text, or a parsed recipe's YAML dump (parsed
    again, so it passes the same checks as a recipe file)."""
    if isinstance(recipe, MergeRecipe):
        return (parse_merge_recipe(recipe_yaml(recipe), _recipe_name(recipe), strict=strict)[0],
                recipe_yaml(recipe))
    if isinstance(recipe, StageRecipe):
        return recipe.recipe, recipe.text
    path = Path(recipe)
    return load_merge_recipe(path, strict=strict)[0], read_recipe_text(path)


def _recipe_name(recipe: str | Path | MergeRecipe | StageRecipe) -> str:
    """The name the lock records for ``recipe``: a file's name (with the stage's), or ``<MergeRecipe>``."""
    if isinstance(recipe, StageRecipe):
        return f"{recipe.file.name}#{recipe.name}"
    return "<MergeRecipe>" if isinstance(recipe, MergeRecipe) else Path(recipe).name


def merge(recipe: str | Path | MergeRecipe | StageRecipe, out_dir: str | Path, *, overwrite: bool = False,
          out_shard_size: int | None = DEFAULT_SHARD_BYTES, device: str = "cpu",
          allow_pickle: bool = False, copy_tokenizer_files: bool = True,
          random_seed: int | None = None, max_memory: int | None = DEFAULT_MAX_MEMORY,
          pipelined: bool = True, progress: bool = False, force: bool = False, resume: bool = False,
          locked: bool = False, lock_file: str | Path | None = None,
          allow_nonfinite: bool = False, allow_crimes: bool = False, strict: bool = False) -> MergeResult:
    """Merge a recipe's models into ``out_dir``: a transformers model (``output: adapter``: an adapter).

    Args:
        recipe: a YAML recipe's path (mergekit's format; stages: see merging_stages) or a MergeRecipe.
        out_dir: output folder; it appears only once the merge is complete, with ``fusekit.lock``.
        overwrite: replace an existing non-empty ``out_dir`` (an up-to-date output is still kept).
        out_shard_size: largest shard in bytes (None: one file).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        allow_pickle: accept ``.bin``/``.pt`` inputs (loaded with ``weights_only=True``).
        copy_tokenizer_files: copy the tokenizer of ``tokenizer_source`` (default: the base).
        random_seed: seed for stochastic methods (DARE, DELLA, ...); see :func:`explicit_seed`.
        max_memory: bound on resident memory in bytes (None: unbounded); big tensors go in row blocks.
        pipelined: overlap reading, arithmetic and writing (sequential gives the same bytes).
        progress: show a progress bar on stderr.
        force: recompute even when ``out_dir`` is up to date with its lock (implies overwrite).
        resume: continue an interrupted run from its verified shards (keep this run's if interrupted).
        locked: refuse to run (:class:`~fusekit.errors.LockMismatchError`) if an input differs from the lock.
        lock_file: the lock ``locked`` compares with (default: ``out_dir/fusekit.lock``); its seed is reused.
        allow_nonfinite: write NaN/Inf values instead of stopping with an error naming the tensor.
        allow_crimes: merge models whose ``model_type`` or ``architectures`` differ (``--allow-crimes``).
        strict: refuse recipe settings that have no effect (see :func:`plan_merge`).

    Returns:
        The :class:`MergeResult` (``up_to_date`` when nothing had to be recomputed).

    Raises:
        FusekitError: a user mistake, one line: the recipe, an input, the output folder or the lock.

    Example:
        >>> fusekit.merge("configs/linear.yaml", "./merged")  # doctest: +SKIP
    """
    if not isinstance(recipe, (MergeRecipe, StageRecipe)) and is_multistage(recipe):
        return _merge_stages(dict(locals()))  # every option reaches every stage, new options too
    started = time.perf_counter()
    out_dir = _check_early(Path(out_dir), random_seed, overwrite=(overwrite := overwrite or force))
    parsed, text = _read_recipe(recipe, strict=strict)
    if is_adapter_output(parsed):  # every input a LoRA adapter over one base: PEFT writes an adapter
        return _merge_adapters(dict(locals()))
    merge_plan = build_plan(parsed, recipe_text=text, allow_pickle=allow_pickle, allow_crimes=allow_crimes)
    stochastic, seed = _seed_for(parsed, random_seed, out_dir, locked=locked, lock_file=lock_file)
    lock_fields = _lock_fields(merge_plan, recipe, out_shard_size, copy_tokenizer_files)
    with claim_output(out_dir, inputs=merge_inputs(merge_plan, recipe), overwrite=overwrite, update=True), \
            _fingerprints(merge_plan, recipe, rehash=locked or resume) as fingerprints:
        if locked:
            check_locked(Path(lock_file or out_dir / LOCK_FILE), fingerprints.result())
        fresh = None if force else up_to_date_lock(out_dir, seed, fingerprints, lock_fields, rehash=locked,
                                                   stochastic=stochastic, overwrite=overwrite)
        if fresh is not None:
            return _up_to_date_result(merge_plan, out_dir, fresh.get("random_seed"), started)
        return _run(merge_plan, out_dir, fingerprints, lock_fields, device=device, stochastic=stochastic,
                    out_shard_size=out_shard_size, copy_tokenizer_files=copy_tokenizer_files,
                    random_seed=seed, max_memory=max_memory, pipelined=pipelined,
                    progress=progress, resume=resume, allow_nonfinite=allow_nonfinite)


def _lock_fields(merge_plan: Plan, recipe: str | Path | MergeRecipe | StageRecipe, out_shard_size: int | None,
                 copy_tokenizer_files: bool) -> dict[str, Any]:
    """What the lock records besides the seed, inputs and outputs: the recipe and the output options."""
    return {"recipe_text": merge_plan.recipe_text, "recipe_name": _recipe_name(recipe),
            "options": {"out_shard_size": out_shard_size, "copy_tokenizer": copy_tokenizer_files}}


def _seed_for(recipe: MergeRecipe, random_seed: int | None, out_dir: Path, *, locked: bool,
              lock_file: str | Path | None) -> tuple[bool, int | None]:
    """Whether the recipe's method is stochastic, and the seed :func:`explicit_seed` finds for it."""
    stochastic = get_method(recipe.merge_method).stochastic
    return stochastic, explicit_seed(random_seed, recipe.random_seed, _seed_lock(out_dir, locked, lock_file),
                                     locked=locked, stochastic=stochastic)


def _seed_lock(out_dir: Path, locked: bool, lock_file: str | Path | None) -> Path | None:
    """The lock whose seed a merge reuses: ``--lock-file``, else ``--locked``'s ``OUT_DIR/fusekit.lock``."""
    if lock_file is not None:
        return Path(lock_file)
    return out_dir / LOCK_FILE if locked else None


def explicit_seed(option: int | None, pinned: int | None, lock: Path | None, *, locked: bool,
                  stochastic: bool) -> int | None:
    """The seed a merge is asked to use: ``--random-seed`` (``option``), else the recipe's ``random_seed:``
    (``pinned``), else the seed ``lock`` records (``--lock-file``, or ``--locked``'s lock).

    None when none of them names one (the up-to-date check then accepts the output's own lock's seed,
    and a new build picks a fresh one), and always for a deterministic method: its output depends on
    no seed, so none is recorded.

    Raises:
        LockMismatchError: ``locked``, and an explicit seed differs from the one the lock pins.
        FusekitError: ``lock`` (a ``--lock-file`` without ``--locked``) does not exist.

    Example:
        >>> explicit_seed(None, 7, None, locked=False, stochastic=True)
        7
    """
    if not stochastic:
        return None
    asked, source = (option, "--random-seed") if option is not None else (pinned, "the recipe's random_seed")
    if lock is None or (asked is not None and not locked):
        return asked
    if not locked and not lock.is_file():
        raise FusekitError(f"--lock-file {lock}: no such file; name the {LOCK_FILE} an earlier merge "
                           "wrote, or drop --lock-file")
    pinned_by_lock = lock_seed(lock)
    if asked is None or pinned_by_lock is None:
        return pinned_by_lock if asked is None else asked
    if asked != pinned_by_lock:
        raise LockMismatchError(f"--locked: {source} is {asked} but {lock} pins random seed "
                                f"{pinned_by_lock}; drop {source} to rebuild with the locked seed, or "
                                "merge without --locked to write a new lock")
    return asked


def _merge_adapters(options: dict[str, Any]) -> MergeResult:
    """:func:`merge` of an ``output: adapter`` recipe (:func:`fusekit.lora.adapter_merge.merge_adapters`);
    ``options`` are merge()'s locals. Its result carries the fields of :class:`MergeResult` that
    callers read."""
    from fusekit.lora.adapter_merge import merge_adapters
    from fusekit.lora.adapter_recipe import COMBINATIONS, adapter_merge_options

    recipe, parsed = options["recipe"], options["parsed"]
    options["random_seed"] = explicit_seed(
        options["random_seed"], parsed.random_seed,
        _seed_lock(options["out_dir"], options["locked"], options["lock_file"]), locked=options["locked"],
        stochastic=COMBINATIONS[adapter_merge_options(parsed).combination].stochastic)
    recipe_file = (None if isinstance(recipe, MergeRecipe) else
                   recipe.file if isinstance(recipe, StageRecipe) else Path(recipe))
    kept = ("overwrite", "force", "random_seed", "allow_pickle", "locked", "lock_file")
    return merge_adapters(options["parsed"], options["text"], options["out_dir"],  # type: ignore[return-value]
                          recipe_name=_recipe_name(recipe), recipe_dir=_recipe_dir(recipe),
                          recipe_file=recipe_file, **{key: options[key] for key in kept})


def _merge_stages(options: dict[str, Any]) -> MergeResult:
    """:func:`merge` of a multi-stage recipe file; ``options`` are merge()'s arguments."""
    from fusekit.merging_stages import merge_stages

    return merge_stages(options.pop("recipe"), options.pop("out_dir"), **options)


def _check_early(out_dir: Path, random_seed: int | None, *, overwrite: bool) -> Path:
    """The checks that need no plan: the seed's range and the output folder's place and contents."""
    if random_seed is not None:
        check_option("--random-seed", check_seed, random_seed)
    check_output_location(out_dir)  # an unusable path is one line before anything stats it
    check_output_folder(out_dir, overwrite=overwrite or (out_dir / LOCK_FILE).is_file())
    return out_dir


@contextlib.contextmanager
def _fingerprints(merge_plan: Plan, recipe: str | Path | MergeRecipe | StageRecipe, *,
                  rehash: bool) -> Iterator[InputFingerprints]:
    """The inputs' digests, computed in the background while the merge runs; cancelled after."""
    fingerprints = InputFingerprints(merge_plan.models, rehash=rehash,
                                     names=portable_refs(merge_plan.models, _recipe_dir(recipe)))
    try:
        yield fingerprints
    finally:
        fingerprints.cancel()


def _up_to_date_result(merge_plan: Plan, out_dir: Path, seed: int | None, started: float) -> MergeResult:
    """What :func:`merge` returns when the output already matched its lock: nothing was computed."""
    stats = ExecutionStats(tensors=0, bytes_read=0, bytes_written=0,
                           seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes(),
                           files=tuple(sorted(out_dir.glob("*.safetensors"))))
    return MergeResult(out_dir=out_dir, plan=merge_plan, seed=seed, up_to_date=True, stats=stats)


def merge_inputs(merge_plan: Plan, recipe: str | Path | MergeRecipe | StageRecipe) -> list[tuple[str, Path]]:
    """What a merge reads, as (label, path) for :func:`~fusekit.io.outputs.claim_output`: the
    models, the tokenizer source and the recipe file."""
    models = [*merge_plan.models.values()]
    if merge_plan.tokenizer_source is not None:
        models.append(merge_plan.tokenizer_source)
    found = model_inputs(models)
    if not isinstance(recipe, MergeRecipe):
        found.append(("recipe", recipe.file if isinstance(recipe, StageRecipe) else Path(recipe)))
    return found


def _recipe_dir(recipe: str | Path | MergeRecipe | StageRecipe) -> Path:
    """The folder paths in the lock and card are relative to: the recipe's, or the current one."""
    if isinstance(recipe, StageRecipe):
        return recipe.file.absolute().parent
    return Path.cwd() if isinstance(recipe, MergeRecipe) else Path(recipe).absolute().parent


def up_to_date_lock(out_dir: Path, seed: int | None, fingerprints: InputFingerprints,
                    lock_fields: dict[str, Any], *, stochastic: bool = True, overwrite: bool,
                    rehash: bool = False) -> dict[str, Any] | None:
    """``out_dir``'s lock when the output matches it (``seed`` None: whichever seed it records, for a
    ``stochastic`` method); else None (or an error without ``overwrite``, so a stale output is never
    replaced unasked). ``rehash``: re-read every output byte, not the digest cache (``--locked``)."""
    if not (out_dir / LOCK_FILE).is_file():
        return None
    try:
        old = read_lock(out_dir / LOCK_FILE)
    except LockMismatchError:
        old, reason = None, f"{LOCK_FILE} is unreadable"
    if old is not None:
        if seed is None and stochastic:
            seed = old.get("random_seed")
        if stochastic and not isinstance(seed, int):
            reason = "the lock has no random seed"
        else:
            wanted = make_lock(seed=seed if stochastic else None, inputs=fingerprints.result(), **lock_fields)
            reason = stale_reason(old, wanted, out_dir, rehash=rehash) or ""
            if not reason:
                return old
    if not overwrite:
        raise OutputExistsError(f"output folder '{out_dir}' is out of date ({reason}); pass "
                                "--overwrite to rebuild it")
    log.warning("%s is out of date (%s); rebuilding it", out_dir, reason)
    return None


def _run(merge_plan: Plan, out_dir: Path, fingerprints: InputFingerprints,
         lock_fields: dict[str, Any], *, device: str, out_shard_size: int | None,
         copy_tokenizer_files: bool, random_seed: int | None, max_memory: int | None, stochastic: bool,
         pipelined: bool, progress: bool, resume: bool, allow_nonfinite: bool) -> MergeResult:
    """Merge into a partial folder (a resumed one, or new), then write side files and the lock (the
    seed recorded only for a ``stochastic`` method)."""
    specs = [TensorSpec(t.output, t.shape, t.out_dtype) for t in merge_plan.tasks]
    key = run_key({"recipe": recipe_sha256(merge_plan.recipe_text), "options": lock_fields["options"],
                   "inputs": input_layout(merge_plan.models), "versions": library_versions(),
                   "layout": [[s.name, list(s.shape), str(s.dtype)] for s in specs]})
    found, seed = _resume_point(merge_plan, out_dir, key, fingerprints, random_seed, resume=resume)
    recorded = seed if stochastic else None
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
                             seed=recorded, names=fingerprints.names)
            write_lock(temp, make_lock(seed=recorded, inputs=fingerprints.result(),
                                       outputs=_output_digests(temp, guard), **lock_fields))
    except NonFiniteError as exc:
        named = _name_nonfinite_input(merge_plan, exc)
        if named is exc:
            raise
        raise named from exc
    stats = replace(stats, files=tuple(out_dir / f.name for f in stats.files))
    return MergeResult(out_dir=out_dir, plan=merge_plan, stats=stats, seed=recorded,
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
        if merge_plan.vocab is not None:  # an aligned input: check the stored tensor it comes from
            tensor_input = replace(tensor_input, name=merge_plan.vocab.stored_name(tensor_input.model,
                                                                                   tensor_input.name))
        with open_reader(merge_plan.models[tensor_input.model]) as reader:
            value = reader.get(tensor_input.name)
        if value.is_floating_point() and not is_finite(value):
            return NonFiniteError(
                f"tensor '{tensor_input.name}' of model '{tensor_input.model}' holds NaN or infinity "
                f"(it feeds output tensor '{task.output}'); repair or replace that checkpoint, or "
                "pass --allow-nonfinite to merge it anyway", task.output)
    return exc


def pick_seed(seed: int | None, *, stochastic: bool) -> int:
    """``seed`` itself, or for a method that draws random numbers a fresh one (logged); 0 for one
    that draws none (the seed is unused, so runs stay byte-identical)."""
    if seed is not None:
        return seed
    if not stochastic:
        return 0
    chosen = secrets.randbelow(2**31)
    log.warning("random seed %d (pass --random-seed %d, or pin random_seed: in the recipe, to repeat "
                "this merge)", chosen, chosen)
    return chosen


def write_side_files(merge_plan: Plan, out: Path, *, name: str, tokenizer: bool = True,
                     seed: int | None = None, names: Mapping[str, str] | None = None) -> None:
    """config.json, generation config, tokenizer, model card and the recipe, beside the weights
    (``seed``: a stochastic method's, shown in the card; None for a deterministic one).

    ``names`` (ref → name, :func:`~fusekit.io.lock.portable_refs`) keeps absolute paths out of the
    model card; the recipe copy stays byte for byte what the user wrote.
    """
    write_json(out / "config.json", merge_plan.out_config)
    donor = merge_plan.models[merge_plan.donor]
    copy_generation_config(donor, out)
    if merge_plan.vocab is not None and merge_plan.tokenizer_source is not None:
        # the rows were permuted: the output's ids are only right with the tokenizer built for them
        write_output_tokenizer(merge_plan.tokenizer_source, merge_plan.vocab.vocab, out)
    elif tokenizer and merge_plan.tokenizer_source is not None:
        copy_tokenizer(merge_plan.tokenizer_source, out)
    writes_tokenizer = tokenizer or merge_plan.vocab is not None
    if writes_tokenizer and merge_plan.tokenizer_source is not None and merge_plan.chat_template is not None:
        write_chat_template(out, merge_plan.chat_template)
    recipe: MergeRecipe = merge_plan.recipe
    write_text(out / "README.md", model_card(
        name=name, method=recipe.merge_method, models=list(merge_plan.models),
        base=recipe.base_model, recipe_text=merge_plan.recipe_text, seed=seed, names=names,
        adapters={ref: (m.base_ref or ref, m.adapter.ref)
                  for ref, m in merge_plan.models.items() if m.adapter}))
    write_text(out / RECIPE_COPY, merge_plan.recipe_text)
