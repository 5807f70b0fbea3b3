"""The search loop of ``fusekit tune``: ask the optimiser, evaluate, tell, checkpoint, repeat.

Every generation's points are evaluated by the :mod:`~fusekit.tune.runner` (in this process or on
Ray), in order, and told to the optimiser in order, so the result depends on the seed and never on
the number of workers. After each generation the optimiser's state and every candidate so far are
written atomically into the output folder (``state.pkl``, ``state.json``, ``candidates.jsonl``);
``resume=True`` reads them back and continues with the exact stream of points an uninterrupted run
would have asked for. ``best.yaml`` and the reports are written only when the search has finished.

An ensemble recipe has nothing to search: its member weights are learned in one go from the
members' cached log-probabilities on the data (:mod:`fusekit.select.mixture`).

Example:
    >>> result = tune("configs/tune/merge-cma.yaml", "tuned")  # doctest: +SKIP
    >>> result.best.score, result.recipe["merge_method"]  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusekit.errors import FusekitError, OutputExistsError, note_kept_partial
from fusekit.io.files import atomic_file, write_json

if TYPE_CHECKING:
    from fusekit.tune.evaluate import Evaluation
    from fusekit.tune.runner import Runner
    from fusekit.tune.spec import TuneSpec

__all__ = ["Candidate", "TuneResult", "tune"]

STATE_FILE = "state.pkl"
"""The checkpoint that ``resume`` reads (pickled: optimiser state and every candidate)."""
STATE_SUMMARY = "state.json"
CANDIDATES = "candidates.jsonl"
BEST_RECIPE = "best.yaml"
STATE_VERSION = 1


@dataclass(frozen=True)
class Candidate:
    """One evaluated point of the search (one line of ``candidates.jsonl``).

    Attributes:
        index: its place in the search, from 0.
        generation: the optimiser generation that asked for it (for ``adam``: the step).
        point: where it lies in the unit cube of the search space.
        parameters: each search dimension's path and the value the recipe got there.
        key: the digest of its recipe (candidates with the same key are the same merge).
        score: bits per byte on the ``data`` files (lower is better).
        test_score: bits per byte on the ``test`` files, where it was measured.
        seconds: how long its evaluation took (0 for a repeated candidate answered from memory).
        worker: which process evaluated it.
    """

    index: int
    generation: int
    point: tuple[float, ...]
    parameters: dict[str, Any]
    key: str
    score: float
    test_score: float | None
    seconds: float
    worker: str


@dataclass(frozen=True)
class TuneResult:
    """What :func:`tune` found and wrote.

    Attributes:
        out_dir: the output folder.
        best: the candidate with the lowest data score (the first one on a tie).
        recipe: the plain recipe written to ``best.yaml``.
        candidates: every candidate, in order.
        report: what ``report.json`` holds (test scores of the best, uniform, single models...).
    """

    out_dir: Path
    best: Candidate
    recipe: dict[str, Any]
    candidates: tuple[Candidate, ...]
    report: dict[str, Any] = field(default_factory=dict)


@dataclass
class _State:
    """The search so far: what a checkpoint holds."""

    optimizer: dict[str, Any] | None = None
    candidates: list[Candidate] = field(default_factory=list)
    generation: int = 0
    elapsed_s: float = 0.0


@dataclass(frozen=True)
class _Run:
    """Everything one search needs besides its state."""

    spec: TuneSpec
    out: Path
    device: str
    workers: int
    address: str | None
    max_memory: int | None
    progress: bool
    digest: str


def tune(recipe: str | Path, out_dir: str | Path, *, device: str = "cpu", workers: int | None = None,
         address: str | None = None, resume: bool = False, overwrite: bool = False,
         max_memory: int | None = None, progress: bool = False) -> TuneResult:
    """Search the coefficients of a recipe with search spaces and a ``tune:`` block.

    Args:
        recipe: the recipe file (a merge or an ensemble recipe with ``tune:``).
        out_dir: the output folder: candidates, checkpoints, ``best.yaml``, reports, ``progress.png``.
        device: where candidates are merged and scored (``cpu``, ``cuda``).
        workers: candidates evaluated at once (default: the recipe's ``tune.workers``); above 1, or
            with ``address``, on Ray.
        address: a Ray cluster to join (``auto``, ``host:port``, ``ray://host:port``).
        resume: continue the search checkpointed in ``out_dir``.
        overwrite: replace a previous ``fusekit tune`` output in ``out_dir``.
        max_memory: bytes a candidate may take in memory; larger ones go through a temporary folder.
        progress: draw a progress bar (evaluations, best score, ETA) and one line per generation.

    Returns:
        The :class:`TuneResult`.

    Raises:
        FusekitError: a bad recipe, data file, budget or address, an output folder that is not
            empty (without ``resume`` or ``overwrite``), a checkpoint of another recipe.
    """
    from fusekit.io.outputs import claim_output
    from fusekit.tune.runner import check_address
    from fusekit.tune.spec import check_data_files, load_tune_spec

    spec = load_tune_spec(recipe)
    check_data_files(spec.settings)
    if address is not None:  # an unreachable cluster is refused before anything is written
        check_address(address)
    run = _Run(spec, Path(out_dir), device, workers or spec.settings.workers, address, max_memory,
               progress, hashlib.sha256(spec.text.encode()).hexdigest())
    markers = (STATE_FILE, STATE_SUMMARY)
    if not (resume or overwrite):
        _refuse_unfinished(run.out)
    with claim_output(run.out, inputs=_inputs(spec), overwrite=overwrite, update=resume,
                      markers=markers) as out:
        state = _load_state(run) if resume else None
        if state is None and overwrite and out.is_dir():
            _empty(out)
        with _keep_or_remove(out, created=not out.exists()):
            return _finish(run, _search(run, state or _State()))


def _refuse_unfinished(out: Path) -> None:
    """A search that was stopped is neither continued nor replaced without being asked to."""
    if (out / STATE_FILE).is_file() and not (out / BEST_RECIPE).exists():
        raise OutputExistsError(f"output folder '{out}' holds an unfinished search; continue it with "
                                "--resume, or start again with --overwrite")


def _inputs(spec: TuneSpec) -> list[tuple[str, Path]]:
    """What the output must stay clear of: the recipe, the data files and local model folders."""
    found: list[tuple[str, Path]] = [("recipe", spec.path)]
    found += [("data file", Path(p)) for p in (*spec.settings.data, *spec.settings.test)]
    for ref in model_refs(spec.base_recipe, with_base=True):
        if Path(ref).expanduser().exists():
            found.append((f"model '{ref}'", Path(ref).expanduser()))
    return found


def model_refs(recipe: dict[str, Any], *, with_base: bool) -> list[str]:
    """The model references of a recipe's ``models:`` (and ``base_model:``), each once, in order."""
    refs: list[str] = []
    entries = list(recipe.get("models") or [])
    for slice_ in recipe.get("slices") or []:
        entries += list(slice_.get("sources") or [])
    for entry in entries:
        ref = entry.get("model") if isinstance(entry, dict) else entry
        if isinstance(ref, str) and ref not in refs:
            refs.append(ref)
    base = recipe.get("base_model")
    if isinstance(base, str) and with_base and base not in refs:
        refs.append(base)
    return refs


def _empty(out: Path) -> None:
    """Remove a previous tune output's contents (the claim checked it is one)."""
    for entry in out.iterdir():
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


@contextlib.contextmanager
def _keep_or_remove(out: Path, *, created: bool) -> Iterator[None]:
    """On failure, remove an output folder this run created before its first checkpoint; keep one
    with a checkpoint (named on the exception, so the CLI can say ``--resume`` continues it)."""
    try:
        yield
    except BaseException as exc:
        if (out / STATE_FILE).is_file():
            note_kept_partial(exc, out)
        elif created and out.is_dir():
            shutil.rmtree(out, ignore_errors=True)
        raise


def _load_state(run: _Run) -> _State | None:
    """The checkpoint in the output folder, or None when there is none yet."""
    path = run.out / STATE_FILE
    if not path.is_file():
        return None
    try:
        with path.open("rb") as handle:
            saved = pickle.load(handle)
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError, ValueError) as exc:
        raise FusekitError(f"{path}: cannot read the checkpoint ({exc}); run without --resume and with "
                           "--overwrite to start again") from None
    if not isinstance(saved, dict) or saved.get("version") != STATE_VERSION:
        raise FusekitError(f"{path}: not a checkpoint of this fusekit version; run with --overwrite "
                           "instead of --resume to start again")
    if saved.get("recipe_sha256") != run.digest:
        raise FusekitError(f"{path}: the checkpoint belongs to another version of the recipe "
                           f"{run.spec.path}; restore that recipe, or run with --overwrite to start again")
    candidates = [Candidate(**c) for c in saved["candidates"]]
    return _State(saved["optimizer"], candidates, saved["generation"], saved["elapsed_s"])


def _checkpoint(run: _Run, state: _State) -> None:
    """Write the state atomically: the pickle ``resume`` reads, its JSON summary, the candidates."""
    run.out.mkdir(parents=True, exist_ok=True)
    saved = {"version": STATE_VERSION, "recipe_sha256": run.digest, "optimizer": state.optimizer,
             "candidates": [asdict(c) for c in state.candidates], "generation": state.generation,
             "elapsed_s": state.elapsed_s}
    with atomic_file(run.out / STATE_FILE) as temp:
        temp.write_bytes(pickle.dumps(saved, protocol=pickle.HIGHEST_PROTOCOL))
    _write_candidates(run.out, state.candidates)
    best = _best(state.candidates) if state.candidates else None
    summary = {"partial": True, "generation": state.generation, "evaluations": len(state.candidates),
               "elapsed_s": round(state.elapsed_s, 3), "best_score": best.score if best else None,
               "best_index": best.index if best else None, "recipe": str(run.spec.path)}
    with atomic_file(run.out / STATE_SUMMARY) as temp:
        write_json(temp, summary)


def _write_candidates(out: Path, candidates: Sequence[Candidate]) -> None:
    import json

    lines = []
    for c in candidates:
        row = asdict(c)
        row["point"] = list(c.point)
        lines.append(json.dumps(row, sort_keys=False))
    with atomic_file(out / CANDIDATES) as temp:
        temp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def _best(candidates: Sequence[Candidate]) -> Candidate:
    """The lowest data score; the earliest candidate on a tie."""
    return min(candidates, key=lambda c: (c.score, c.index))


# -- the loop -----------------------------------------------------------------------------------------


class _Budget:
    """Evaluations and wall time left (wall time counts every session of a resumed search)."""

    def __init__(self, spec: TuneSpec, state: _State) -> None:
        self.evaluations = spec.settings.evaluations
        self.wall_time_s = spec.settings.wall_time_s
        self._start = time.monotonic() - state.elapsed_s

    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def left(self, done: int) -> int | None:
        """Evaluations still allowed (None: no limit); 0 when the wall time has run out."""
        if self.wall_time_s is not None and self.elapsed() >= self.wall_time_s:
            return 0
        return None if self.evaluations is None else max(0, self.evaluations - done)


def _search(run: _Run, state: _State) -> list[Candidate]:
    """Run (or continue) the search; return every candidate."""
    if run.spec.kind == "ensemble":
        from fusekit.tune.report import learn_ensemble_weights

        return learn_ensemble_weights(run.spec, device=run.device)
    budget = _Budget(run.spec, state)
    with _progress(run, state) as step:
        if run.spec.settings.optimizer == "adam":
            _gradient_loop(run, state, budget, step)
        else:
            _optimizer_loop(run, state, budget, step)
    return state.candidates


def _optimizer_loop(run: _Run, state: _State, budget: _Budget, step: Callable[[_State], None]) -> None:
    """CMA-ES, random or grid search: one generation per turn, checkpointed after its tell."""
    from fusekit.tune.evaluate import Evaluator
    from fusekit.tune.optimizers import make_optimizer
    from fusekit.tune.runner import make_runner

    optimizer = make_optimizer(run.spec)
    if state.optimizer is not None:
        optimizer.load_state_dict(state.optimizer)
    left = budget.left(len(state.candidates))
    if optimizer.done() or left == 0:
        return
    evaluator = Evaluator(run.spec, device=run.device, max_memory=run.max_memory,
                          work_dir=run.out / ".work")
    runner = make_runner(run.workers, address=run.address, device=run.device)
    try:
        while not optimizer.done() and left != 0:
            points = optimizer.ask()
            asked = len(points)
            points = points[:left] if left is not None else points
            found = _evaluate(run, state, points, evaluator, runner)
            if len(points) == asked:  # a generation cut short by the budget is the last one
                optimizer.tell(points, [c.score for c in found])
            state.generation += 1
            state.optimizer = optimizer.state_dict()
            state.elapsed_s = budget.elapsed()
            _checkpoint(run, state)
            step(state)
            left = budget.left(len(state.candidates))
    finally:
        runner.close()
        shutil.rmtree(run.out / ".work", ignore_errors=True)


def _evaluate(run: _Run, state: _State, points: Sequence[Sequence[float]], evaluator: Callable[..., Any],
              runner: Runner) -> list[Candidate]:
    """Evaluate one generation's points (each new recipe once), append them to the state in order."""
    space = run.spec.space
    keys = [space.key(p) for p in points]
    known: dict[str, Candidate] = {c.key: c for c in state.candidates}
    fresh: dict[str, Sequence[float]] = {}
    for key, point in zip(keys, points, strict=True):
        if key not in known and key not in fresh:
            fresh[key] = point
    results = runner.map(evaluator, [space.recipe_for(p) for p in fresh.values()])
    evaluated: dict[str, Evaluation] = dict(zip(fresh, results, strict=True))
    found = []
    for key, point in zip(keys, points, strict=True):
        new = _candidate(run, state, point, key, evaluated.pop(key, None) or known[key])
        known.setdefault(key, new)
        state.candidates.append(new)
        found.append(new)
    return found


def _candidate(run: _Run, state: _State, point: Sequence[float], key: str, result: Any) -> Candidate:
    """A candidate from an evaluation (or from an earlier candidate with the same recipe)."""
    repeated = isinstance(result, Candidate)
    return Candidate(index=len(state.candidates), generation=state.generation,
                     point=tuple(float(x) for x in point),
                     parameters=run.spec.space.values(point), key=key, score=float(result.score),
                     test_score=None if result.test_score is None else float(result.test_score),
                     seconds=0.0 if repeated else float(result.seconds),
                     worker="repeat" if repeated else str(result.worker))


def _gradient_loop(run: _Run, state: _State, budget: _Budget, step: Callable[[_State], None]) -> None:
    """The ``adam`` optimiser: one gradient step per turn (one evaluation), checkpointed each step."""
    from fusekit.tune.gradient import GradientSearch

    search = GradientSearch(run.spec, device=run.device, max_memory=run.max_memory)
    if state.optimizer is not None:
        search.load_state_dict(state.optimizer)
    while not search.done() and budget.left(len(state.candidates)) != 0:
        point, result = search.step()
        state.candidates.append(_candidate(run, state, point, run.spec.space.key(point), result))
        state.generation += 1
        state.optimizer = search.state_dict()
        state.elapsed_s = budget.elapsed()
        _checkpoint(run, state)
        step(state)


@contextlib.contextmanager
def _progress(run: _Run, state: _State) -> Iterator[Callable[[_State], None]]:
    """A bar over evaluations (its ETA from tqdm) and one line per generation with the best score."""
    from fusekit import progress

    if not run.progress:
        yield lambda _state: None
        return
    total = run.spec.settings.evaluations
    shown = [len(state.candidates)]
    with progress.steps(f"tuning {run.spec.path.name}", total=total, unit="eval") as advance:
        advance(shown[0])

        def step(now: _State) -> None:
            advance(len(now.candidates) - shown[0])
            shown[0] = len(now.candidates)
            best = _best(now.candidates)
            progress.write(f"generation {now.generation}: {len(now.candidates)}"
                           f"{'' if total is None else f'/{total}'} evaluations, best {best.score:.4f} "
                           f"bits/byte (candidate {best.index}), {now.elapsed_s:.0f} s")

        yield step


# -- the end ------------------------------------------------------------------------------------------


def _finish(run: _Run, candidates: list[Candidate]) -> TuneResult:
    """Write best.yaml, the reports and the plot; return the result."""
    from fusekit.tune.report import best_recipe, write_reports

    if not candidates:
        raise FusekitError(f"{run.spec.path}: the search evaluated no candidate; raise tune.budget")
    best = _best(candidates)
    recipe = best_recipe(run.spec, best)
    report = write_reports(run.spec, run.out, candidates, best, recipe, device=run.device,
                           max_memory=run.max_memory)
    return TuneResult(run.out, best, recipe, tuple(candidates), report)
