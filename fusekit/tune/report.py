"""What ``fusekit tune`` writes when a search ends: ``best.yaml``, ``report.json``, ``report.md`` and
``progress.png``, and the learned weights of an ensemble recipe.

The report scores, on the ``test`` texts (the ``data`` texts when there are none, and says so): the
best candidate, the space's default point (the uniform, hand-set merge), every single model of the
recipe, its base model, and a ``prob_avg`` ensemble of the same models (with
:func:`fusekit.ensemble.scoring.score_ensemble`). Single models are scored through the per-token
cache of :mod:`fusekit.select.mixture`, exactly as ``fusekit score`` scores them.

``best.yaml`` is written last: a folder without it is a search that has not finished.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fusekit.io.files import atomic_file, write_json, write_text

if TYPE_CHECKING:
    from fusekit.tune.search import Candidate
    from fusekit.tune.spec import TuneSpec

__all__ = ["best_recipe", "learn_ensemble_weights", "write_reports"]

MIN_WEIGHT = 1e-6
"""An ensemble weight is positive: learned weights below this are written as this."""


def _round(value: float) -> float:
    return float(f"{value:.6g}")


def best_recipe(spec: TuneSpec, best: Candidate) -> dict[str, Any]:
    """The plain recipe of ``best``: for a merge, the space's recipe at its point (what was
    evaluated); for an ensemble, the recipe with each member's learned ``parameters.weight``."""
    if spec.kind != "ensemble":
        return spec.space.recipe_for(list(best.point))
    recipe = {k: v for k, v in spec.base_recipe.items() if k != "tune"}
    models = []
    for entry, weight in zip(recipe["models"], best.point, strict=True):
        member = dict(entry) if isinstance(entry, dict) else {"model": entry}
        member.pop("weight", None)
        member["parameters"] = {"weight": _round(max(weight, MIN_WEIGHT))}
        models.append(member)
    recipe["models"] = models
    return recipe


def learn_ensemble_weights(spec: TuneSpec, *, device: str = "cpu") -> list[Candidate]:
    """An ensemble recipe's search: its uniform weights, then the weights learned on the data.

    Returns:
        Two candidates (uniform, learned) whose points are the members' weights.
    """
    import time

    from fusekit.select.mixture import learn_weights, member_token_logprobs, mixture_bpb
    from fusekit.tune.evaluate import read_texts, worker_name
    from fusekit.tune.search import Candidate, model_refs

    refs = model_refs(spec.base_recipe, with_base=False)
    started = time.perf_counter()
    lp = member_token_logprobs(refs, read_texts(spec.settings.data), device=device)
    uniform = [1.0 / len(refs)] * len(refs)
    learned = [_round(w) for w in learn_weights(lp)]
    seconds = time.perf_counter() - started
    found = []
    for index, weights in enumerate((uniform, learned)):
        found.append(Candidate(index=index, generation=index, point=tuple(weights),
                               parameters={f"models[{i}].parameters.weight": w
                                           for i, w in enumerate(weights)},
                               key=_digest(weights), score=mixture_bpb(lp, weights), test_score=None,
                               seconds=seconds if index else 0.0, worker=worker_name()))
    return found


def _digest(weights: Sequence[float]) -> str:
    return hashlib.sha256(json.dumps(list(weights)).encode()).hexdigest()[:20]


def write_reports(spec: TuneSpec, out: Path, candidates: Sequence[Candidate], best: Candidate,
                  recipe: dict[str, Any], *, device: str = "cpu",
                  max_memory: int | None = None) -> dict[str, Any]:
    """Score the comparisons, write the plot, ``report.json``, ``report.md`` and (last) ``best.yaml``.

    Returns:
        What ``report.json`` holds.
    """
    out.mkdir(parents=True, exist_ok=True)
    rows = (_ensemble_rows(spec, best, device=device) if spec.kind == "ensemble"
            else _merge_rows(spec, candidates, best, recipe, device=device, max_memory=max_memory))
    report = _report(spec, candidates, best, rows)
    _plot(spec, out, candidates, report)
    write_json(out / "report.json", report)
    write_text(out / "report.md", format_markdown(report))
    with atomic_file(out / "best.yaml") as temp:
        write_text(temp, _yaml(spec, best, recipe))
    _mark_finished(out, report)
    return report


def _mark_finished(out: Path, report: dict[str, Any]) -> None:
    summary_path = out / "state.json"
    summary = json.loads(summary_path.read_text(encoding="utf-8")) if summary_path.is_file() else {}
    summary.update(partial=False, best_score=report["best"]["score"], best_index=report["best"]["index"])
    with atomic_file(summary_path) as temp:
        write_json(temp, summary)


def _yaml(spec: TuneSpec, best: Candidate, recipe: dict[str, Any]) -> str:
    import yaml

    command = "fusekit ensemble" if spec.kind == "ensemble" else "fusekit merge best.yaml OUT"
    head = (f"# Written by fusekit tune from {spec.path.name}: candidate {best.index}, "
            f"{best.score:.6f} bits/byte on the data.\n# Reproduce it with: {command}\n")
    return head + yaml.safe_dump(recipe, sort_keys=False)


# -- comparisons --------------------------------------------------------------------------------------


def _test_texts(spec: TuneSpec) -> tuple[list[str], str]:
    """The texts the report scores on, and which ones they are (``test``, else ``data``)."""
    from fusekit.tune.evaluate import read_texts

    if spec.settings.test:
        return read_texts(spec.settings.test), "test"
    return read_texts(spec.settings.data), "data"


def _row(name: str, kind: str, data: float | None, test: float | None) -> dict[str, Any]:
    return {"name": name, "kind": kind, "data_bpb": data, "test_bpb": test}


def _merge_rows(spec: TuneSpec, candidates: Sequence[Candidate], best: Candidate, recipe: dict[str, Any], *,
                device: str, max_memory: int | None) -> list[dict[str, Any]]:
    """Best, default and uniform merges, single models, the base and the prob ensemble. Data scores
    come from the search where it evaluated the recipe; only the test texts are scored here."""
    from fusekit.progress import label
    from fusekit.tune.evaluate import Evaluator
    from fusekit.tune.search import model_refs

    texts, which = _test_texts(spec)
    on_test = Evaluator(_scoring_spec(spec, which), device=device, max_memory=max_memory)
    default = spec.space.default_point()
    searched = {c.key: c.score for c in candidates}
    members = model_refs(spec.base_recipe, with_base=False)
    base = spec.base_recipe.get("base_model")
    experts = [m for m in members if m != base]
    rows = []
    for name, kind, candidate, data in (
            ("tuned merge", "tuned", recipe, best.score),
            ("default point of the space", "default", spec.space.recipe_for(default),
             searched.get(spec.space.key(default))),
            ("uniform linear merge", "uniform", uniform_linear_recipe(spec.base_recipe, experts), None)):
        if candidate is not None:
            rows.append(_row(name, kind, data, on_test(candidate).score))
    singles = [*members, base] if isinstance(base, str) and base not in members else members
    for ref, bpb in zip(singles, _single_scores(singles, texts, device), strict=True):
        rows.append(_row(ref, "base" if ref == base else "single", None, bpb))
    if len(experts) >= 2:
        rows.append(_row("prob_avg ensemble of " + ", ".join(label(ref) for ref in experts), "ensemble",
                         None, _ensemble_score(experts, texts, device)))
    return rows


def _scoring_spec(spec: TuneSpec, which: str) -> TuneSpec:
    """``spec`` with the report's texts as its data, so that an Evaluator scores candidates on them."""
    import dataclasses

    texts = spec.settings.test if which == "test" else spec.settings.data
    return dataclasses.replace(spec, settings=dataclasses.replace(spec.settings, data=texts, test=()))


def uniform_linear_recipe(recipe: dict[str, Any], models: Sequence[str]) -> dict[str, Any] | None:
    """The equal-weight linear merge of ``models`` with ``recipe``'s other settings (dtype,
    tokenizer); None for fewer than two models or a recipe of slices."""
    if len(models) < 2 or recipe.get("slices"):
        return None
    skip = {"models", "merge_method", "parameters", "base_model", "slices", "tune"}
    uniform = {"models": [{"model": ref, "parameters": {"weight": 1.0}} for ref in models],
               "merge_method": "linear"}
    uniform.update({k: v for k, v in recipe.items() if k not in skip})
    return uniform


def _single_scores(refs: Sequence[str], texts: Sequence[str], device: str) -> list[float]:
    """Each model's bits per byte on ``texts`` (through the score cache; ``fusekit score``'s
    numbers)."""
    from fusekit.select.mixture import member_token_logprobs, mixture_bpb

    scores = []
    for ref in refs:
        lp = member_token_logprobs([ref], texts, device=device)
        scores.append(mixture_bpb(lp, [1.0]))
    return scores


def _ensemble_score(refs: Sequence[str], texts: Sequence[str], device: str) -> float:
    """Bits per byte of a uniform ``prob_avg`` ensemble of ``refs`` on ``texts``: from the members'
    cached per-token log-probabilities when they share a tokenizer (the same number, see
    :mod:`fusekit.select.mixture`), else with :func:`fusekit.ensemble.scoring.score_ensemble`."""
    import yaml

    from fusekit.errors import FusekitError
    from fusekit.select.mixture import check_same_tokenizer, member_token_logprobs, mixture_bpb

    try:
        check_same_tokenizer(refs)
    except FusekitError:
        from fusekit.ensemble.engine import load_ensemble
        from fusekit.ensemble.recipe import parse_ensemble_recipe
        from fusekit.ensemble.scoring import score_ensemble
        from fusekit.tune.evaluate import total_score

        text = yaml.safe_dump({"models": [{"model": ref} for ref in refs], "method": "prob_avg"})
        ensemble = load_ensemble(parse_ensemble_recipe(text, "<tune report ensemble>")[0], device=device)
        return total_score([score_ensemble(ensemble, t, members=False).ensemble for t in texts])
    return mixture_bpb(member_token_logprobs(refs, texts, device=device), [1.0] * len(refs))


def _ensemble_rows(spec: TuneSpec, best: Candidate, *, device: str) -> list[dict[str, Any]]:
    """Learned and uniform weights, and each member alone, from cached log-probabilities."""
    from fusekit.select.mixture import member_token_logprobs, mixture_bpb
    from fusekit.tune.search import model_refs

    refs = model_refs(spec.base_recipe, with_base=False)
    texts, _ = _test_texts(spec)
    lp = member_token_logprobs(refs, texts, device=device)
    n = len(refs)
    rows = [_row("learned weights", "tuned", best.score, mixture_bpb(lp, list(best.point))),
            _row("uniform weights", "default", None, mixture_bpb(lp, [1.0 / n] * n))]
    for i, ref in enumerate(refs):
        rows.append(_row(ref, "single", None, mixture_bpb(lp, [float(i == j) for j in range(n)])))
    return rows


def _report(spec: TuneSpec, candidates: Sequence[Candidate], best: Candidate,
            rows: list[dict[str, Any]]) -> dict[str, Any]:
    s = spec.settings
    return {"recipe": str(spec.path), "kind": spec.kind, "optimizer": s.optimizer, "seed": s.seed,
            "evaluations": len(candidates), "generations": max(c.generation for c in candidates) + 1,
            "seconds": round(sum(c.seconds for c in candidates), 3),
            "data": list(s.data), "test": list(s.test), "scored_on": "test" if s.test else "data",
            "best": {"index": best.index, "key": best.key, "score": best.score,
                     "parameters": best.parameters},
            "rows": rows, "goal": goal(rows), "partial": False, "best_recipe": "best.yaml"}


def goal(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Whether the tuned model beats the best single model, and the share of the gap between the
    uniform merge and the ensemble it closes (on the report's scoring texts).

    Returns:
        ``best_single``, ``beats_best_single``, ``gap_closed`` (None without an ensemble row or a gap).
    """
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_kind.setdefault(row["kind"], []).append(row)
    tuned = by_kind["tuned"][0]["test_bpb"]
    singles = by_kind.get("single", [])
    best_single = min(singles, key=lambda r: r["test_bpb"]) if singles else None
    result: dict[str, Any] = {"best_single": best_single["name"] if best_single else None,
                              "beats_best_single": bool(best_single and tuned < best_single["test_bpb"]),
                              "gap_closed": None}
    uniform = (by_kind.get("uniform") or by_kind["default"])[0]["test_bpb"]
    if "ensemble" in by_kind and uniform is not None:
        gap = uniform - by_kind["ensemble"][0]["test_bpb"]
        if gap > 0 and math.isfinite(gap):
            result["gap_closed"] = (uniform - tuned) / gap
    return result


def format_markdown(report: dict[str, Any]) -> str:
    """``report.md``: the settings, the comparison table and the goal in words."""
    on = report["scored_on"]
    lines = [f"# fusekit tune: {Path(report['recipe']).name}", "",
             f"{report['kind']} recipe, optimizer {report['optimizer']}, seed {report['seed']}: "
             f"{report['evaluations']} evaluations in {report['generations']} generations "
             f"({report['seconds']:.1f} s of evaluation).", "",
             f"Best candidate: {report['best']['index']} ({report['best']['score']:.4f} bits/byte on the "
             "data); its recipe is best.yaml.", "",
             f"| model | data bits/byte | {on} bits/byte |", "|---|---:|---:|"]
    for row in report["rows"]:
        data = "" if row["data_bpb"] is None else f"{row['data_bpb']:.4f}"
        test = "" if row["test_bpb"] is None else f"{row['test_bpb']:.4f}"
        lines.append(f"| {row['name']} | {data} | {test} |")
    g = report["goal"]
    lines.append("")
    if g["best_single"] is not None:
        verdict = "beats" if g["beats_best_single"] else "does not beat"
        lines.append(f"The tuned model {verdict} the best single model ({g['best_single']}) on the "
                     f"{on} texts.")
    if g["gap_closed"] is not None:
        lines.append(f"It closes {100 * g['gap_closed']:.0f}% of the gap between the uniform merge and the "
                     "prob_avg ensemble.")
    return "\n".join(lines) + "\n"


def _plot(spec: TuneSpec, out: Path, candidates: Sequence[Candidate], report: dict[str, Any]) -> None:
    """``progress.png`` when matplotlib is installed (the ``plot`` extra); nothing otherwise."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    from fusekit.plots import plot_tune_progress

    levels = {row["name"]: row["data_bpb"] for row in report["rows"]
              if row["kind"] in ("default", "uniform") and row["data_bpb"] is not None}
    plot_tune_progress([c.score for c in candidates], out / "progress.png",
                       title=f"fusekit tune {spec.path.name} ({spec.settings.optimizer})", levels=levels)
