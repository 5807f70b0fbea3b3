"""Run and plan multi-stage recipes (:mod:`fusekit.recipe.stages`): each stage is one :func:`merge`.

Where stages go: the last stage is THE output and is written to ``OUT_DIR`` itself, so ``OUT_DIR`` is
an ordinary output (loadable with ``from_pretrained(OUT_DIR)``, pushable with ``fusekit push``, with
its own ``fusekit.lock``). Every earlier stage goes to ``OUT_DIR.stages/<name>`` beside it (or
``stages_dir/<name>``). They are not kept inside ``OUT_DIR``: the output is replaced by an atomic
rename, and an output may never hold one of its own inputs (:func:`fusekit.io.outputs.claim_output`).

Each stage is an ordinary merge with its own lock, hashing the stage's own document: an unchanged
stage whose inputs are unchanged is not recomputed; a stage whose recipe or inputs changed is rebuilt,
and so are the stages that read it, because their input (its output) changed. Earlier stages are
fusekit's own intermediate outputs, so a stale one is rebuilt without ``--overwrite``; ``OUT_DIR``
follows the usual rules. A stage that fails leaves no output that looks complete; the stages before it
stay, complete and locked, and are reused by the next run.

Example:
    >>> merge_stages("configs/multistage.yaml", "merged")  # doctest: +SKIP
    >>> merge_stages("configs/multistage.yaml", "merged", stage="soup")  # only 'soup'  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from fusekit.errors import CheckpointError, CheckpointNotFoundError, OutputPathError
from fusekit.io.lock import LOCK_FILE
from fusekit.io.refs import resolve_model
from fusekit.io.writer import check_output_folder, check_output_location
from fusekit.merging import MergeResult, merge, plan_merge
from fusekit.plan import Plan
from fusekit.recipe.stages import Stage, Stages, load_stages

log = logging.getLogger("fusekit")
STAGES_SUFFIX = ".stages"


@dataclass(frozen=True)
class StagePlan:
    """One stage of :func:`plan_stages`.

    Attributes:
        stage: the stage.
        folder: where ``fusekit merge`` writes it (None when no output folder was given).
        plan: its plan, or None while a stage it reads is not built yet.
        missing: the stages it reads that are not built yet.
    """

    stage: Stage
    folder: Path | None
    plan: Plan | None
    missing: tuple[str, ...]


def default_stages_dir(out_dir: str | Path) -> Path:
    """Where earlier stages go by default: ``OUT_DIR.stages`` beside ``out_dir``.

    >>> default_stages_dir("runs/merged").as_posix()
    'runs/merged.stages'
    """
    out_dir = Path(out_dir)
    return out_dir.parent / f"{out_dir.name}{STAGES_SUFFIX}"


def stage_folders(stages: Stages, out_dir: str | Path,
                  stages_dir: str | Path | None = None) -> dict[str, Path]:
    """Stage name → output folder: the last stage ``out_dir``, the others ``stages_dir/<name>``."""
    where = Path(stages_dir) if stages_dir is not None else default_stages_dir(out_dir)
    folders = {s.label: where / s.label for s in stages.stages}
    folders[stages.final.label] = Path(out_dir)
    return folders


def merge_stages(recipe: str | Path, out_dir: str | Path, *, stage: str | None = None,
                 stages_dir: str | Path | None = None, **options: Any) -> MergeResult:
    """Build a multi-stage recipe's stages in file order; the last one into ``out_dir``.

    Args:
        recipe: the multi-stage recipe file.
        out_dir: the output folder: the last stage's output.
        stage: build only this stage and the stages it reads (each skipped when up to date);
            ``force`` then applies to this stage alone.
        stages_dir: where earlier stages go (default :func:`default_stages_dir`).
        **options: :func:`fusekit.merge`'s options, passed to every stage; ``overwrite`` and
            ``lock_file`` concern ``out_dir`` only (earlier stages are always rebuilt when stale and
            checked against their own locks).

    Returns:
        The :class:`MergeResult` of the last stage built, with ``stages`` listing every stage's.

    Raises:
        FusekitError: one line, before anything is written when the recipe, a model or a folder is
            wrong; a stage that fails leaves the complete stages before it.
    """
    stages = load_stages(recipe)
    out_dir = Path(out_dir)
    folders = stage_folders(stages, out_dir, stages_dir)
    todo = stages.needed(stages.get(stage).label) if stage is not None else list(stages.stages)
    _check_folders(todo, folders, out_dir, options)
    _check_models(stages, todo, allow_pickle=bool(options.get("allow_pickle")))
    results: list[tuple[str, MergeResult]] = []
    for each in todo:
        folder = folders[each.label]
        step = dict(options)
        if folder != out_dir:
            step.update(overwrite=True, lock_file=None)
        if stage is not None and each.label != stage:
            step["force"] = False
        log.info("stage %d/%d '%s' → %s", len(results) + 1, len(todo), each.label, folder)
        results.append((each.label, merge(stages.recipe_for(each, folders), folder, **step)))
    return replace(results[-1][1], stages=tuple(results))


def _check_folders(todo: list[Stage], folders: dict[str, Path], out_dir: Path,
                   options: dict[str, Any]) -> None:
    """Refuse an unusable output or stages folder before any stage runs."""
    targets = [folders[s.label] for s in todo]
    if out_dir in targets:
        overwrite = bool(options.get("overwrite") or options.get("force")) or (out_dir / LOCK_FILE).is_file()
        check_output_folder(out_dir, overwrite=overwrite)
    out = Path(os.path.abspath(out_dir))
    for folder in targets:
        if folder == out_dir:
            continue
        check_output_location(folder, what="stage folder")
        inner = Path(os.path.abspath(folder))
        if out in inner.parents or inner in out.parents:
            raise OutputPathError(f"stage folder '{folder}' and the output folder '{out_dir}' lie one inside "
                                  "the other; the output may not hold its own inputs, so give a stages "
                                  "folder outside it (--stages-dir)")


def _check_models(stages: Stages, todo: list[Stage], *, allow_pickle: bool) -> None:
    """Find every model the stages name that is not on disk (a Hub id, or a missing path) before any
    stage runs, so a typo in the last stage does not wait for the first to finish."""
    names = {s.label for s in stages.stages}
    for stage in todo:
        for ref in stage.recipe.model_refs():
            if ref in names or "+" in ref or Path(ref).expanduser().exists():
                continue
            try:
                resolve_model(ref, allow_pickle=allow_pickle)
            except (CheckpointNotFoundError, CheckpointError) as exc:
                raise type(exc)(f"{exc} (in stage '{stage.label}' of {stages.file})") from None


def plan_stages(recipe: str | Path, *, out_dir: str | Path | None = None,
                stages_dir: str | Path | None = None, **options: Any) -> tuple[Stages, list[StagePlan]]:
    """Plan every stage whose inputs exist, reading headers and configs only.

    Args:
        recipe: the multi-stage recipe file.
        out_dir: where ``fusekit merge`` writes it: a stage reading earlier stages is planned from
            their outputs there; without it (or before they are built) its plan is None.
        stages_dir: as for :func:`merge_stages`.
        **options: :func:`fusekit.plan_merge`'s options.

    Returns:
        The stages and one :class:`StagePlan` per stage, in build order.
    """
    stages = load_stages(recipe)
    folders = stage_folders(stages, out_dir, stages_dir) if out_dir is not None else {}
    plans = []
    for stage in stages.stages:
        missing = tuple(u for u in stage.uses if u not in folders or not (folders[u] / LOCK_FILE).is_file())
        plan = None if missing else plan_merge(stages.recipe_for(stage, folders), **options)
        plans.append(StagePlan(stage, folders.get(stage.label), plan, missing))
    return stages, plans
