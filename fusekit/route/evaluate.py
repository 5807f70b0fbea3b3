"""``fusekit.route.evaluate_router``: a router's quality against every single model, the oracle and
a uniform merge, its cost-quality trade-off across thresholds, and how well calibration holds.

Quality is bits per byte pooled over the data (total bits / total bytes) with each example scored by
the model the router picks; every model scores every example once, so each row of the cost-quality
table costs no further model runs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fusekit.io.refs import split_adapter_ref
from fusekit.progress import enabled as progress_enabled
from fusekit.route.data import Example, load_examples
from fusekit.route.labels import Scores, score_column, score_matrix
from fusekit.route.policy import choose
from fusekit.route.router import Router, is_arrow_router, load_router

if TYPE_CHECKING:
    from fusekit.route.arrow import Arrow

log = logging.getLogger("fusekit")

DEFAULT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DEFAULT_SHARES = (0.25, 0.5, 0.75)
NEAR = 0.01
"""A routed choice within this fraction of the best model's bits per byte counts as near the oracle:
where the best two models are that close, which one the loss oracle names is close to a coin flip."""


@dataclass(frozen=True)
class TableRow:
    """One threshold of the cost-quality table."""

    threshold: float
    shares: dict[str, float]  # model name → share of calls
    dear_share: float  # share of calls to models dearer than the cheapest
    mean_cost: float
    bits_per_byte: float
    accuracy: float  # agreement with the oracle's choice


@dataclass(frozen=True)
class CalibrationRow:
    """A requested share of dear calls, the threshold the router's calibration queries give it (the
    build's cross-validated predictions, or ``calibrate.data``), and the share it gives on the
    evaluation data.

    Both query sets are samples, so even a perfect calibration misses by about ``stderr``
    (``sqrt(p (1 - p) (1 / n_calibration + 1 / n_evaluation))``: 3.3 points at p = 0.5 with 900 and
    300 queries)."""

    requested: float
    threshold: float
    achieved: float
    stderr: float  # sampling standard error of ``achieved``: binomial, calibration and evaluation sets


@dataclass
class EvalReport:
    """Everything ``fusekit route eval`` prints (what :func:`evaluate_router` returns).

    Bits per byte are pooled over the data (lower is better): ``routed`` with each example scored by
    the model the router picks, ``oracle`` by the best model for it, ``single`` by each model alone,
    ``merge`` by a uniform linear merge of ``merge_models`` (None: no two models could be merged).
    ``table`` holds one row per threshold, ``calibration`` one per requested share.
    """

    router: str
    data: str
    examples: int
    threshold: float
    accuracy: float  # vs the oracle (the best model per example by bits per byte)
    near_oracle: float  # share of examples whose routed model is within NEAR of the oracle's bits per byte
    accuracy_given: float | None  # vs the data's 'label' fields, when every example has one
    accuracy_domain: float | None  # vs the data's 'domain' fields, when each names a model
    routed: float
    oracle: float
    single: dict[str, float]
    merge: float | None
    merge_models: list[str]
    table: list[TableRow]
    calibration: list[CalibrationRow]
    calibration_source: str | None = None  # the queries file the router was calibrated on, if any
    notes: list[str] = field(default_factory=list)
    costs: dict[str, float] = field(default_factory=dict)  # model name → cost of one call
    oracle_dear_share: float | None = None  # share of examples whose best model is a dearer one
    oracle_mean_cost: float | None = None  # mean cost per call of always picking the best model
    router_type: str = ""  # the router's kind: knn, logistic, mlp, mf, arrow
    compared: dict[str, float] = field(default_factory=dict)  # other router folder → its bits per byte

    @property
    def best_single(self) -> tuple[str, float]:
        """The name and bits per byte of the best single model."""
        name = min(self.single, key=self.single.__getitem__)
        return name, self.single[name]

    def to_dict(self) -> dict[str, Any]:
        """Every field as plain JSON data, plus ``best_single`` and ``routed_vs_oracle``."""
        out = asdict(self)
        out["best_single"] = dict(zip(("model", "bits_per_byte"), self.best_single, strict=True))
        out["routed_vs_oracle"] = self.routed / self.oracle - 1
        return out

    def format_text(self) -> str:
        """The report as the text ``fusekit route eval`` prints: figures, table, calibration."""
        best, best_bpb = self.best_single
        pct = self.routed / self.oracle - 1
        arrow = self.router_type == "arrow"
        lines = [f"router {self.router} on {self.data}: {self.examples} examples, "
                 + ("Arrow (each token routed in each layer)" if arrow
                    else f"threshold {self.threshold:.4f}"),
                 f"routing accuracy {self.accuracy:.1%} ("
                 + ("the adapter with the largest mean Arrow weight " if arrow else "")
                 + f"vs the best model per example by bits per byte); "
                 f"{self.near_oracle:.1%} within {NEAR:.0%} of the best model's bits per byte"]
        if self.accuracy_given is not None:
            lines.append(f"routing accuracy {self.accuracy_given:.1%} (vs the data's labels)")
        if self.accuracy_domain is not None:
            lines.append(f"routing accuracy {self.accuracy_domain:.1%} (vs the data's domains)")
        routed = "arrow" if arrow else "routed"
        lines += ["", "bits per byte (lower is better):",
                  f"  {routed:<15} {self.routed:.4f}  ({pct:+.2%} vs oracle)",
                  f"  oracle          {self.oracle:.4f}  (each example scored by its best model)"]
        for name, value in sorted(self.single.items(), key=lambda kv: kv[1]):
            tag = "  (best single model)" if name == best else ""
            lines.append(f"  {name:<15} {value:.4f}{tag}")
        if self.merge is not None:
            lines.append(f"  {'uniform merge':<15} {self.merge:.4f}  (linear merge of "
                         f"{', '.join(self.merge_models)})")
        for name, value in self.compared.items():
            lines.append(f"  {name:<15} {value:.4f}  (router, {value / self.oracle - 1:+.2%} vs oracle)")
        verdict = f"{routed} is {'better' if self.routed < best_bpb else 'not better'} than the best " \
                  f"single model ({best})"
        if self.merge is not None:
            verdict += f" and {'better' if self.routed < self.merge else 'not better'} than the uniform merge"
        lines.append(verdict)
        lines += self._table_lines()
        lines += [f"note: {note}" for note in self.notes]
        return "\n".join(lines)

    def _table_lines(self) -> list[str]:
        """The cost-quality table and the calibration rows, as text (none for an Arrow router)."""
        if not self.table:
            return []
        names = list(self.single)
        lines = ["", "cost-quality table:",
                  "threshold  " + "  ".join(f"{n[:10]:>10}" for n in names) +
                  "  dear share  mean cost  bits/byte  accuracy"]
        for row in self.table:
            lines.append(f"{row.threshold:9.4f}  " + "  ".join(f"{row.shares[n]:10.1%}" for n in names) +
                         f"  {row.dear_share:10.1%}  {row.mean_cost:9.3f}  {row.bits_per_byte:9.4f}"
                         f"  {row.accuracy:8.1%}")
        if self.calibration:
            source = self.calibration_source or "the build's cross-validated predictions"
            lines += ["", f"calibration (threshold set on {source}):",
                      "requested dear share  threshold  achieved here     error  sampling s.e."]
            for cal in self.calibration:
                lines.append(f"{cal.requested:20.1%}  {cal.threshold:9.4f}  {cal.achieved:13.1%}  "
                             f"{(cal.achieved - cal.requested) * 100:+5.1f} pt  {cal.stderr * 100:10.1f} pt")
        return lines


def _digest(folder: Path, names: Sequence[str]) -> str:
    for name in names:
        if (folder / name).is_file():
            return hashlib.sha256((folder / name).read_bytes()).hexdigest()
    return ""


def mergeable_group(router: Router | Arrow) -> list[int]:
    """The largest set (≥ 2) of the router's models sharing tokenizer and architecture."""
    groups: dict[tuple[str, str], list[int]] = {}
    for index, model in enumerate(router.models):
        pair = split_adapter_ref(model.folder)  # base+adapter: the base's config and tokenizer
        folder = Path(pair[0] if pair else model.folder)
        try:
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        shape = json.dumps({k: config.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                         "intermediate_size", "vocab_size",
                                                         "num_attention_heads", "num_key_value_heads")},
                           sort_keys=True)
        key = (_digest(folder, ("tokenizer.json", "vocab.json", "tokenizer.model")), shape)
        groups.setdefault(key, []).append(index)
    best = max(groups.values(), key=len, default=[])
    return best if len(best) >= 2 else []


def uniform_merge_column(router: Router | Arrow, group: Sequence[int], examples: Sequence[Example], *,
                         device: str, batch_size: int, context: int | None,
                         use_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``group`` with equal weights (``fusekit.merge``, linear) in a temporary folder and score it.

    Returns:
        The merge's ``(n_examples,)`` bits and ``(n_examples,)`` bytes, as :func:`score_column`.
    """
    from fusekit.merging import merge
    from fusekit.recipe.schema import MergeRecipe, ModelEntry

    recipe = MergeRecipe(merge_method="linear", dtype="float32",
                         models=[ModelEntry(model=router.models[i].folder, parameters={"weight": 1.0})
                                 for i in group])
    with tempfile.TemporaryDirectory(prefix="fusekit-route-merge-") as tmp:
        merge(recipe, Path(tmp) / "merged", random_seed=0, progress=progress_enabled())
        return score_column(str(Path(tmp) / "merged"), examples, device=device, batch_size=batch_size,
                            context=context, use_cache=use_cache,
                            desc=f"scoring {len(examples)} examples with the uniform merge")


def near_oracle(bpb: torch.Tensor, chosen: torch.Tensor) -> float:
    """Share of rows of ``bpb`` ``(n, n_models)`` where ``chosen`` is within :data:`NEAR` of the best."""
    routed = bpb.gather(1, chosen[:, None]).squeeze(1)
    return float((routed <= bpb.min(1).values * (1 + NEAR)).double().mean())


def _table_row(router: Router, q: torch.Tensor, scores: Scores, oracle: torch.Tensor,
               threshold: float) -> TableRow:
    chosen = choose(q, router.order, threshold)
    counts = torch.bincount(chosen, minlength=len(router.models)).double() / len(chosen)
    costs = torch.tensor([m.cost for m in router.models], dtype=torch.float64)
    dear = torch.isin(chosen, torch.tensor(router.dear_indices(), dtype=torch.long))
    return TableRow(threshold, dict(zip(router.names, counts.tolist(), strict=True)),
                    float(dear.double().mean()), float(costs[chosen].mean()), scores.pooled(chosen),
                    float((chosen == oracle).double().mean()))


def _uniform_merge_bpb(router: Router | Arrow, examples: Sequence[Example], *, device: str, batch_size: int,
                       context: int | None, use_cache: bool) -> tuple[float | None, list[str]]:
    """Pooled bits per byte of a uniform merge of :func:`mergeable_group` and its models' names
    (None and [] when no two models can be merged)."""
    group = mergeable_group(router)
    if not group:
        return None, []
    nll, n_bytes = uniform_merge_column(router, group, examples, device=device, batch_size=batch_size,
                                        context=context, use_cache=use_cache)
    return float(nll.sum() / n_bytes.sum()), [router.models[i].name for i in group]


def _given_accuracies(router: Router | Arrow, examples: Sequence[Example],
                      chosen: torch.Tensor) -> tuple[float | None, float | None]:
    """Agreement of ``chosen`` with the data's ``label`` fields and with its ``domain`` fields, each
    None unless every example has one naming a model."""
    index = {name: i for i, name in enumerate(router.names)}
    given = domain = None
    if all(e.label is not None for e in examples):
        labels = torch.tensor([index[str(e.label)] for e in examples])
        given = float((chosen == labels).double().mean())
    if all(e.extra.get("domain") in index for e in examples):
        domains = torch.tensor([index[str(e.extra["domain"])] for e in examples])
        domain = float((chosen == domains).double().mean())
    return given, domain


def _calibration_rows(router: Router, q: torch.Tensor, shares: Sequence[float] | None,
                      n_eval: int) -> list[CalibrationRow]:
    """For each requested share (and the recipe's own), the threshold the router's calibration
    values give it and the share it gives on the evaluation queries' probabilities ``q``."""
    if not (router.dear_indices() and router.calibration_tail.numel()):
        return []
    wanted = list(DEFAULT_SHARES if shares is None else shares)
    own = router.info.get("calibration", {}).get("share")
    if own is not None and own not in wanted:
        wanted.append(own)
    tail = router.dear_tail(q)
    n_cal = router.calibration_tail.numel()
    rows = []
    for share in sorted(wanted):
        t = router.threshold_for_share(share)
        stderr = math.sqrt(share * (1 - share) * (1 / n_cal + 1 / n_eval))
        rows.append(CalibrationRow(share, t, float((tail > t).double().mean()), stderr))
    return rows


def _merge_comparison(router: Router | Arrow, examples: Sequence[Example], with_merge: bool,
                      settings: _Settings) -> tuple[float | None, list[str], list[str]]:
    """The uniform merge's bits per byte, the models merged, and a note when none can be merged."""
    if not with_merge:
        return None, [], []
    merge_bpb, merge_names = _uniform_merge_bpb(router, examples, device=settings.device,
                                                batch_size=settings.batch_size, context=settings.context,
                                                use_cache=settings.use_cache)
    if merge_names:
        return merge_bpb, merge_names, []
    return None, [], ["no two models share tokenizer and architecture, so there is no uniform merge to "
                      "compare with"]


def evaluate_router(router_dir: str | Path, data: str | Path, *, device: str = "cpu",
                    thresholds: Sequence[float] | None = None, shares: Sequence[float] | None = None,
                    with_merge: bool = True, batch_size: int = 8, context: int | None = None,
                    use_cache: bool = True, compare: Sequence[str | Path] = ()) -> EvalReport:
    """Score every model of the router on ``data`` and measure the router against them.

    An Arrow router is measured by its own model's bits per byte (:func:`evaluate_arrow`).

    Args:
        router_dir: a folder written by ``fusekit route build``.
        data: JSONL examples (``text``, or ``prompt`` + ``completion``; ``label`` and ``domain``
            are used for extra accuracy figures when present).
        device: where the models run.
        thresholds: rows of the cost-quality table (default 0, 0.1, …, 1 and the router's own).
        shares: dear-call shares to calibrate on the router's calibration queries and check here
            (default 25%, 50%, 75% and the recipe's own).
        with_merge: also score a uniform linear merge of the models sharing tokenizer and architecture.
        batch_size: examples per forward pass when scoring.
        context: longest scoring window in tokens (default: the model's, at most 1024).
        use_cache: take per-example scores from the score cache where the same model scored the
            same text before, and save new ones (:mod:`fusekit.lm.score_cache`); False scores afresh.
        compare: more router folders (any kind) measured on the same data, reported beside it.

    Returns:
        The :class:`EvalReport`.

    Raises:
        RouterFolderError: ``router_dir`` (or a ``compare`` folder) is not a router folder.
        RouteDataError: ``data`` is missing or malformed, or a label names no model of the router.

    Example:
        >>> print(evaluate_router("./router", "test.jsonl").format_text())  # doctest: +SKIP
    """
    settings = _Settings(device, batch_size, context, use_cache)
    if is_arrow_router(router_dir):
        return evaluate_arrow(router_dir, data, settings, with_merge=with_merge, compare=compare)
    router = load_router(router_dir, device=device)
    examples = load_examples(data, models=router.names)
    scores = _scores(router, examples, settings)
    bpb = scores.bits_per_byte
    oracle = bpb.argmin(1)
    q = router.probabilities([e.query for e in examples])
    chosen = choose(q, router.order, router.threshold)
    given, domain = _given_accuracies(router, examples, chosen)
    merge_bpb, merge_names, notes = _merge_comparison(router, examples, with_merge, settings)
    rows = sorted(set(DEFAULT_THRESHOLDS if thresholds is None else thresholds) | {router.threshold})
    table = [_table_row(router, q, scores, oracle, t) for t in rows]
    calibration = _calibration_rows(router, q, shares, len(examples))
    if not router.dear_indices():
        notes.append("every model has the same cost, so the dear-call share is always 0")
    return EvalReport(
        router=str(router_dir), data=str(data), examples=len(examples), threshold=router.threshold,
        accuracy=float((chosen == oracle).double().mean()), near_oracle=near_oracle(bpb, chosen),
        accuracy_given=given, accuracy_domain=domain,
        routed=scores.pooled(chosen), oracle=scores.pooled(oracle),
        single={name: scores.pooled(torch.full_like(oracle, i)) for i, name in enumerate(router.names)},
        merge=merge_bpb, merge_models=merge_names, table=table, calibration=calibration,
        calibration_source=router.info.get("calibration", {}).get("data"), notes=notes,
        router_type=router.fitted.kind, compared=compare_routers(compare, examples, settings),
        **_oracle_costs(router, oracle))


def _oracle_costs(router: Router, oracle: torch.Tensor) -> dict[str, Any]:
    """The models' costs, and the dear-call share and mean cost of the oracle's choices ``oracle``."""
    costs = torch.tensor([m.cost for m in router.models], dtype=torch.float64)
    dear = torch.isin(oracle, torch.tensor(router.dear_indices(), dtype=torch.long))
    return {"costs": dict(zip(router.names, costs.tolist(), strict=True)),
            "oracle_dear_share": float(dear.double().mean()), "oracle_mean_cost": float(costs[oracle].mean())}


@dataclass(frozen=True)
class _Settings:
    """How models run and score during an evaluation."""

    device: str
    batch_size: int
    context: int | None
    use_cache: bool


def _scores(router: Router | Arrow, examples: Sequence[Example], settings: _Settings) -> Scores:
    """Every model of ``router`` scored on ``examples`` (adapters on one shared base; cached scores
    reused)."""
    return score_matrix([m.reference() for m in router.models], examples, device=settings.device,
                        batch_size=settings.batch_size, context=settings.context,
                        use_cache=settings.use_cache)


def _pooled_arrow(router_dir: str | Path, examples: Sequence[Example], settings: _Settings,
                  *, weights: bool = False) -> tuple[float, torch.Tensor | None]:
    """The Arrow router's pooled bits per byte on ``examples`` and, with ``weights``, each adapter's
    ``(n, n_adapters)`` mean Arrow weight per example (its model is loaded once, then released)."""
    from fusekit.route.arrow import load_arrow, load_arrow_lm, routing_weights, score_arrow

    lm = load_arrow_lm(load_arrow(router_dir), device=settings.device)
    nll, n_bytes = score_arrow(lm, examples, batch_size=settings.batch_size, context=settings.context)
    queries = [e.query for e in examples]
    mean = routing_weights(lm, queries, batch_size=settings.batch_size) if weights else None
    return float(nll.sum() / n_bytes.sum()), mean


def compare_routers(folders: Sequence[str | Path], examples: Sequence[Example],
                    settings: _Settings) -> dict[str, float]:
    """Each router folder's pooled bits per byte on ``examples``, by folder (a fitted router's models
    score from the score cache where they can; an Arrow router runs its model)."""
    out: dict[str, float] = {}
    for folder in folders:
        if is_arrow_router(folder):
            out[str(folder)] = _pooled_arrow(folder, examples, settings)[0]
            continue
        router = load_router(folder, device=settings.device)
        scores = _scores(router, examples, settings)
        out[str(folder)] = scores.pooled(router.route_indices([e.query for e in examples]))
    return out


def evaluate_arrow(router_dir: str | Path, data: str | Path, settings: _Settings, *, with_merge: bool = True,
                   compare: Sequence[str | Path] = ()) -> EvalReport:
    """:func:`evaluate_router` for an Arrow router: its model's bits per byte (``routed``) beside each
    adapter alone, the oracle (the best adapter per example) and the uniform merge; its routing
    accuracy counts the adapter with the largest mean Arrow weight per example. No thresholds."""
    from fusekit.route.arrow import load_arrow

    arrow = load_arrow(router_dir)
    examples = load_examples(data, models=arrow.names)
    scores = _scores(arrow, examples, settings)
    routed, weights = _pooled_arrow(router_dir, examples, settings, weights=True)
    assert weights is not None
    bpb, chosen = scores.bits_per_byte, weights.argmax(1)
    oracle = bpb.argmin(1)
    given, domain = _given_accuracies(arrow, examples, chosen)
    merge_bpb, merge_names, notes = _merge_comparison(arrow, examples, with_merge, settings)
    notes.append(f"Arrow mixes the top {arrow.top_k} adapter(s) per token and layer, so its bits per byte "
                 "can beat the oracle, which keeps one adapter per example")
    return EvalReport(
        router=str(router_dir), data=str(data), examples=len(examples), threshold=0.0,
        accuracy=float((chosen == oracle).double().mean()), near_oracle=near_oracle(bpb, chosen),
        accuracy_given=given, accuracy_domain=domain, routed=routed, oracle=scores.pooled(oracle),
        single={name: scores.pooled(torch.full_like(oracle, i)) for i, name in enumerate(arrow.names)},
        merge=merge_bpb, merge_models=merge_names, table=[], calibration=[], notes=notes,
        costs={m.name: m.cost for m in arrow.models}, router_type="arrow",
        compared=compare_routers(compare, examples, settings))
