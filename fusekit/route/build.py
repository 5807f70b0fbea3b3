"""``fusekit.route.build_router``: label the data, fit features and router, calibrate, save."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from fusekit.io.outputs import claim_output, model_inputs
from fusekit.io.refs import ResolvedModel, resolve_model
from fusekit.io.writer import atomic_output, check_output_folder
from fusekit.progress import bar, steps
from fusekit.recipe.load import read_recipe_text
from fusekit.route.calibration import calibrate_on_queries, read_queries
from fusekit.route.data import Example, load_examples
from fusekit.route.features import make_featurizer
from fusekit.route.fitted import fit_router
from fusekit.route.labels import (
    LabelError,
    Scores,
    given_labels,
    loss_labels,
    pairwise_labels,
    require_two_classes,
    score_matrix,
)
from fusekit.route.policy import DEFAULT_THRESHOLD, calibrate, cheap_group, choose, cost_order
from fusekit.route.recipe import ArrowRouter, RouteRecipe, RouterSpec, load_route_recipe
from fusekit.route.router import CONFIG_FILE, RoutedModel, Router, save_router

if TYPE_CHECKING:
    from fusekit.route.arrow import Arrow

ROUTER_MARKERS = (CONFIG_FILE, "fusekit.lock")  # a folder holding one is a router fusekit wrote
log = logging.getLogger("fusekit")


@dataclass(frozen=True)
class BuildResult:
    """The saved router and what building it measured (what :func:`build_router` returns).

    Attributes:
        out_dir: the router folder written.
        router: the router, as saved (``router.info`` holds the training and calibration summary), or
            the :class:`~fusekit.route.arrow.Arrow` router for ``router: arrow``.
        seconds: wall time of the build.
    """

    out_dir: Path
    router: Router | Arrow
    seconds: float


def fold_groups(examples: Sequence[Example], block: int, folds: int) -> list[int]:
    """The group of each example: cross-validation keeps a group in one fold.

    A ``group`` field on every line (a source document, a conversation, a user) is used as it is.
    Otherwise runs of ``block`` consecutive lines form a group (shorter runs when the data is too
    small to give every fold two runs): data files usually list pieces of one source next to each
    other, and a router scored on near-copies of its training queries looks better, and more sure of
    itself, than it will on new data, which skews the calibrated threshold.
    """
    if examples and all("group" in e.extra for e in examples):
        ids: dict[str, int] = {}
        return [ids.setdefault(json.dumps(e.extra["group"], sort_keys=True), len(ids)) for e in examples]
    block = max(1, min(block, len(examples) // (2 * folds)))
    return [i // block for i in range(len(examples))]


def fold_indices(groups: Sequence[int], folds: int, seed: int) -> list[list[int]]:
    """Deterministic split of the examples into ``folds`` parts, whole groups at a time (groups
    dealt in a seeded random order, each to the fold with the fewest examples so far)."""
    n_groups = max(groups, default=-1) + 1
    if folds > n_groups:
        raise LabelError(f"folds: {folds} is more than the {n_groups} groups of examples that "
                         "cross-validation keeps together (equal 'group' fields, or runs of lines); "
                         "lower 'folds', or add data")
    members: list[list[int]] = [[] for _ in range(n_groups)]
    for index, group in enumerate(groups):
        members[group].append(index)
    parts: list[list[int]] = [[] for _ in range(folds)]
    for group in torch.randperm(n_groups, generator=torch.Generator().manual_seed(seed)).tolist():
        min(parts, key=len).extend(members[group])
    return [sorted(part) for part in parts]


def out_of_fold(spec: RouterSpec, x: torch.Tensor, y: torch.Tensor, n_models: int,
                parts: Sequence[Sequence[int]], seed: int) -> torch.Tensor:
    """``(n, n_models)`` probabilities for each example from a router trained without its part."""
    q = torch.zeros(x.shape[0], n_models)
    for index, part in enumerate(bar(parts, desc=f"calibrating: {len(parts)}-fold cross-validation",
                                     unit="fold")):
        held = list(part)
        keep = torch.ones(x.shape[0], dtype=torch.bool)
        keep[held] = False
        fitted = fit_router(spec, x[keep], y[keep], n_models, seed=seed + index)
        q[held] = fitted.probabilities(x[held])
    return q


def make_labels(recipe: RouteRecipe, examples: list[Example], order: list[int], *, device: str,
                data: str, use_cache: bool = True) -> tuple[torch.Tensor, Scores | None]:
    """``(n,)`` best-model indices for ``examples``, and the scores behind them (None for given)."""
    names = recipe.names
    if len(names) == 1:
        return torch.zeros(len(examples), dtype=torch.long), None
    if recipe.labels.method == "given":
        return given_labels(examples, names, data), None
    scores = score_matrix([m.model for m in recipe.models], examples, device=device,
                          batch_size=recipe.labels.batch_size, context=recipe.labels.context,
                          use_cache=use_cache)
    if recipe.labels.method == "pairwise":
        return pairwise_labels(scores, recipe.labels.margin), scores
    return loss_labels(scores, order), scores


def _calibrate(parsed: RouteRecipe, router: Router, examples: list[Example], x: torch.Tensor,
               labels: torch.Tensor, scores: Scores | None, queries: list[str] | None,
               training: dict[str, object]) -> dict[str, object]:
    """Set the threshold (on ``queries`` when the recipe names calibration data, else on
    cross-validated predictions), add held-out measures to ``training``; the calibration summary."""
    calibration: dict[str, object] = {"share": None}
    if queries is not None and parsed.calibrate is not None:
        calibrate_on_queries(router, queries, parsed.calibrate.share, str(parsed.calibrate.data))
        calibration = router.info["calibration"]
    if parsed.folds < 2 or len(router.models) < 2:
        return calibration
    parts = fold_indices(fold_groups(examples, parsed.fold_block, parsed.folds), parsed.folds, parsed.seed)
    assert not isinstance(parsed.router, ArrowRouter)
    q = out_of_fold(parsed.router, x, labels, len(router.models), parts, parsed.seed)
    if queries is None:
        router.calibration_tail = router.dear_tail(q)
        if parsed.calibrate is not None:
            router.threshold = calibrate(router.calibration_tail, parsed.calibrate.share)
            calibration["share"] = parsed.calibrate.share
    chosen = choose(q, router.order, router.threshold)
    training["heldout_accuracy"] = float((chosen == labels).double().mean())
    calibration["heldout_dear_share"] = float(
        torch.isin(chosen, torch.tensor(router.dear_indices(), dtype=torch.long)).double().mean())
    if scores is not None:
        training["heldout_bits_per_byte"] = scores.pooled(chosen)
        training["heldout_oracle_bits_per_byte"] = scores.pooled(scores.bits_per_byte.argmin(1))
    return calibration


def _labels_in_cost_order(parsed: RouteRecipe, examples: list[Example], *, device: str, use_cache: bool
                          ) -> tuple[torch.Tensor, Scores | None, torch.Tensor, list[int]]:
    """The best-model labels, the scores behind them, each model's label count (float64) and the
    models' cost order (equal costs: fewer wins first; loss labels then give ties to the cheaper)."""
    costs = [m.cost for m in parsed.models]
    provisional = cost_order(costs, [0.0] * len(costs))
    assert parsed.data is not None
    labels, scores = make_labels(parsed, examples, provisional, device=device, data=parsed.data,
                                 use_cache=use_cache)
    require_two_classes(labels, parsed.names, parsed.labels.method)
    counts = torch.bincount(labels, minlength=len(parsed.names)).double()
    order = cost_order(costs, (counts / counts.sum()).tolist())
    if scores is not None and parsed.labels.method == "loss":  # ties go to the cheaper model
        labels = loss_labels(scores, order)
    return labels, scores, counts, order


def build_router(recipe: str | Path, out_dir: str | Path, *, overwrite: bool = False,
                 device: str = "cpu", use_cache: bool = True) -> BuildResult:
    """Build the router a recipe describes and save it in ``out_dir`` (written atomically).

    Args:
        recipe: path of a YAML router recipe.
        out_dir: the router folder to write.
        overwrite: replace an existing non-empty ``out_dir``.
        device: where models run for labels and features (``cpu``, ``cuda``, ``auto``).
        use_cache: take per-example scores from the score cache where the same model scored the
            same text before, and save new ones (:mod:`fusekit.lm.score_cache`); False scores afresh.

    Returns:
        A :class:`BuildResult`: the folder, the router and the build's wall time.

    Raises:
        RecipeError: the recipe is invalid (one line naming the file, line and key).
        RouteDataError: a data or calibration file is missing or malformed.
        LabelError: the labels give fewer than two classes, or fewer groups than folds.
        OutputExistsError: ``out_dir`` is not empty and ``overwrite`` is not set.

    Example:
        >>> build_router("configs/route/tfidf-knn.yaml", "./router")  # doctest: +SKIP
    """
    start = time.perf_counter()
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    recipe_path = Path(recipe)
    parsed, _ = load_route_recipe(recipe_path)
    resolved = [resolve_model(m.model) for m in parsed.models]  # fail early on a missing model
    if isinstance(parsed.router, ArrowRouter):
        return _build_arrow(parsed, resolved, recipe_path, out_dir, overwrite=overwrite, start=start)
    assert parsed.data is not None  # the recipe requires it for every router but arrow
    inputs = [*model_inputs(resolved), ("recipe", recipe_path), ("data", Path(parsed.data))]
    if parsed.calibrate is not None and parsed.calibrate.data is not None:
        inputs.append(("calibration data", Path(parsed.calibrate.data)))
    # Held for the whole build (minutes of scoring), so a second build aimed here refuses at once.
    with claim_output(out_dir, inputs=inputs, overwrite=overwrite, markers=ROUTER_MARKERS):
        router = _fit(parsed, resolved, device=device, use_cache=use_cache)
        with atomic_output(out_dir, overwrite=overwrite) as temp:
            save_router(router, temp, name=out_dir.name, recipe_text=read_recipe_text(recipe_path))
    return BuildResult(out_dir, router, time.perf_counter() - start)


def _build_arrow(parsed: RouteRecipe, resolved: Sequence[ResolvedModel], recipe_path: Path, out_dir: Path,
                 *, overwrite: bool, start: float) -> BuildResult:
    """Check the adapters and write the Arrow router folder (nothing to fit: PEFT computes the
    prototypes from the adapter weights when the router is used)."""
    from fusekit.route.arrow import build_arrow, save_arrow

    arrow = build_arrow(parsed, resolved)
    inputs = [*model_inputs(resolved), ("recipe", recipe_path)]
    with claim_output(out_dir, inputs=inputs, overwrite=overwrite, markers=ROUTER_MARKERS), \
            atomic_output(out_dir, overwrite=overwrite) as temp:
        save_arrow(arrow, temp, name=out_dir.name, recipe_text=read_recipe_text(recipe_path))
    return BuildResult(out_dir, arrow, time.perf_counter() - start)


def _folder_reference(model: ResolvedModel) -> str:
    """The absolute reference a router falls back to when ``model``'s own stops resolving: its folder,
    or ``base_folder+adapter_folder`` for a LoRA adapter."""
    if model.adapter is None:
        return str(model.folder.resolve())
    return f"{model.folder.resolve()}+{model.adapter.folder.resolve()}"


def _fit(parsed: RouteRecipe, resolved: Sequence[ResolvedModel], *, device: str,
         use_cache: bool = True) -> Router:
    """Label the data, fit features and router, calibrate the threshold: the router to save."""
    names = parsed.names
    assert parsed.data is not None and not isinstance(parsed.router, ArrowRouter)
    examples = load_examples(parsed.data, models=names)
    calibration_data = parsed.calibrate.data if parsed.calibrate is not None else None
    calibration_queries = read_queries(calibration_data) if calibration_data is not None else None
    featurizer = make_featurizer(parsed.features, device=device)
    costs = [m.cost for m in parsed.models]
    labels, scores, counts, order = _labels_in_cost_order(parsed, examples, device=device,
                                                          use_cache=use_cache)
    strength = (counts / counts.sum()).tolist()
    queries = [e.query for e in examples]
    log.info("fitting %s features on %d queries", featurizer.kind, len(queries))
    with steps(f"training: {featurizer.kind} features and the router on {len(queries)} queries",
               total=2, unit="step") as advance:
        featurizer.fit(queries)
        x = featurizer.transform(queries)
        advance(1)
        fitted = fit_router(parsed.router, x, labels, len(names), seed=parsed.seed)
        advance(1)
    models = [RoutedModel(name, m.model, _folder_reference(r), m.cost, s)
              for name, m, r, s in zip(names, parsed.models, resolved, strength, strict=True)]
    router = Router(models, featurizer, fitted, order, cheap_group(costs), DEFAULT_THRESHOLD,
                    torch.zeros(0))
    if parsed.threshold is not None:
        router.threshold = parsed.threshold
    training: dict[str, object] = {
        "examples": len(examples), "labels": parsed.labels.method, "data": parsed.data,
        "label_counts": {name: int(c) for name, c in zip(names, counts.tolist(), strict=True)},
        "folds": parsed.folds, "fold_block": parsed.fold_block,
    }
    calibration = _calibrate(parsed, router, examples, x, labels, scores, calibration_queries, training)
    calibration["threshold"] = router.threshold
    router.info = {"labels": parsed.labels.model_dump(), "training": training, "calibration": calibration}
    return router
