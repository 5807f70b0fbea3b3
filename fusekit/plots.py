"""Pictures of reports: ``route eval --plot`` (the cost-quality curve), ``ensemble score --plot``
(the ensemble against its members) and ``fusekit tune``'s ``progress.png`` (each candidate and the best
so far), drawn with matplotlib, fusekit's optional ``plot`` extra.

What is drawn is computed first, without matplotlib, by :func:`route_curve_series` and
:func:`ensemble_bar_series`, so tests compare the plotted numbers with the report's. Drawing uses the
Agg canvas directly (no pyplot, no display, no global backend switch) and writes the file atomically.

Example:
    >>> check_plot_path("curve.png")  # doctest: +SKIP
    >>> plot_route_curve(evaluate_router("./router", "test.jsonl"), "curve.png")  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fusekit.errors import FusekitError

if TYPE_CHECKING:
    from fusekit.route.evaluate import EvalReport

FORMATS = (".png", ".svg", ".pdf")
"""File types ``--plot`` writes, chosen by the file's suffix."""
SIZE_INCHES = (7.0, 4.5)
DPI = 100
"""A PNG is ``SIZE_INCHES × DPI`` pixels: 700 × 450."""

_COLOURS = ("tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
            "tab:cyan")  # single models; the router is blue, the oracle black

Axis = Literal["dear_share", "mean_cost"]
_AXIS_LABELS: dict[Axis, str] = {"dear_share": "share of calls to dearer models",
                                 "mean_cost": "mean cost per call"}


@dataclass(frozen=True)
class Point:
    """One plotted mark: its legend or tick label, x and y."""

    label: str
    x: float
    y: float


@dataclass(frozen=True)
class CurveSeries:
    """What the cost-quality plot shows; y is always bits per byte (lower is better).

    Attributes:
        axis: what x is, ``dear_share`` (0 to 1) or ``mean_cost``.
        curve: the router at each threshold of the report's table, in order of x.
        routed: the router at its own threshold.
        singles: each model alone, in the report's order.
        oracle: the best model per example (None when the report does not say its cost).
        merge: the uniform merge's bits per byte (a level, not a point: it has no per-call cost).
    """

    axis: Axis
    curve: tuple[Point, ...]
    routed: Point
    singles: tuple[Point, ...]
    oracle: Point | None
    merge: float | None

    @property
    def x_label(self) -> str:
        """The x axis title."""
        return _AXIS_LABELS[self.axis]


def route_curve_series(report: EvalReport, axis: Axis | None = None) -> CurveSeries:
    """The points of ``route eval``'s cost-quality plot, taken from its report.

    Args:
        report: what :func:`fusekit.route.evaluate_router` returned.
        axis: x as the share of dear calls or as the mean cost per call; default: the share when the
            models have exactly two costs, else the mean cost.

    Returns:
        The :class:`CurveSeries`; every y is a bits-per-byte figure of the report.
    """
    costs = report.costs
    if axis is None:
        axis = "dear_share" if len(set(costs.values())) == 2 else "mean_cost"
    cheapest = min(costs.values(), default=0.0)

    def x_of(dear_share: float, mean_cost: float) -> float:
        return dear_share if axis == "dear_share" else mean_cost

    curve = sorted((Point(f"threshold {row.threshold:.2f}", x_of(row.dear_share, row.mean_cost),
                          row.bits_per_byte) for row in report.table), key=lambda p: (p.x, -p.y))
    own = next((row for row in report.table if row.threshold == report.threshold), None)
    routed_x = x_of(own.dear_share, own.mean_cost) if own is not None else float("nan")
    singles = tuple(Point(name, x_of(float(costs[name] > cheapest), costs[name]) if name in costs
                          else float("nan"), bpb) for name, bpb in report.single.items())
    oracle = None
    if report.oracle_dear_share is not None and report.oracle_mean_cost is not None:
        oracle = Point("oracle", x_of(report.oracle_dear_share, report.oracle_mean_cost), report.oracle)
    return CurveSeries(axis, tuple(curve), Point("router", routed_x, report.routed), singles, oracle,
                       report.merge)


def ensemble_bar_series(rows: Sequence[Mapping[str, Any]]) -> tuple[Point, ...]:
    """The bars of ``ensemble score --plot``: one per row, x its position, y its bits per byte.

    Args:
        rows: ``ensemble score``'s rows (``name`` and ``bits_per_byte``), the ensemble first.

    Returns:
        One :class:`Point` per row, in order.
    """
    return tuple(Point(str(row["name"]), float(i), float(row["bits_per_byte"])) for i, row in enumerate(rows))


def check_plot_path(path: str | Path, option: str = "--plot") -> Path:
    """Refuse a plot path before any work: a bad suffix, a folder, a missing folder; or no matplotlib.

    Raises:
        FusekitError: one line naming the option and what to do.
    """
    from fusekit.io.outputs import check_out_file

    target = check_out_file(path, option=option)
    if target.suffix.lower() not in FORMATS:
        raise FusekitError(f"{option} '{path}': the picture's type comes from the suffix; end the name "
                           f"with {', '.join(FORMATS[:-1])} or {FORMATS[-1]}")
    _matplotlib()
    return target


def plot_route_curve(report: EvalReport, path: str | Path, axis: Axis | None = None) -> Path:
    """Draw ``report``'s cost-quality curve with the single models and the oracle to ``path``.

    Args:
        report: what :func:`fusekit.route.evaluate_router` returned.
        path: a ``.png``, ``.svg`` or ``.pdf`` file, written atomically.
        axis: see :func:`route_curve_series`.

    Returns:
        The file written.
    """
    series = route_curve_series(report, axis)
    figure, ax = _figure()
    ax.plot([p.x for p in series.curve], [p.y for p in series.curve], "-o", color="tab:blue",
            markersize=3, label="router, threshold swept")
    ax.plot([series.routed.x], [series.routed.y], "*", color="tab:blue", markersize=14,
            label=f"router at its threshold ({report.threshold:.2f})")
    for index, point in enumerate(series.singles):
        ax.plot([point.x], [point.y], "s", color=_COLOURS[index % len(_COLOURS)], markersize=7,
                label=point.label)
    if series.oracle is not None:
        ax.plot([series.oracle.x], [series.oracle.y], "D", color="black", markersize=7, label="oracle")
    if series.merge is not None:
        ax.axhline(series.merge, color="grey", linestyle="--", linewidth=1, label="uniform merge")
    ax.set_xlabel(series.x_label)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title(f"route eval: {report.examples} examples of {Path(report.data).name}")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(figure, Path(path))


def plot_ensemble_bars(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Draw the ensemble's bits per byte beside each member's as bars to ``path``.

    Args:
        rows: ``ensemble score``'s rows (``name`` and ``bits_per_byte``), the ensemble first.
        path: a ``.png``, ``.svg`` or ``.pdf`` file, written atomically.

    Returns:
        The file written.
    """
    bars = ensemble_bar_series(rows)
    figure, ax = _figure()
    colours = ["tab:orange" if i == 0 else "tab:blue" for i in range(len(bars))]
    drawn = ax.bar([b.x for b in bars], [b.y for b in bars], color=colours)
    ax.bar_label(drawn, labels=[f"{b.y:.4f}" for b in bars], fontsize=8)
    ax.set_xticks([b.x for b in bars], [_short(b.label) for b in bars], rotation=15, ha="right",
                  fontsize=8)
    ax.set_ylabel("bits per byte (lower is better)")
    ax.set_title("ensemble score: the ensemble against each member alone")
    ax.margins(y=0.15)
    return _save(figure, Path(path))


def tune_progress_series(scores: Sequence[float]) -> tuple[tuple[Point, ...], tuple[Point, ...]]:
    """The points of ``fusekit tune``'s ``progress.png``: each candidate's score and the best so far.

    Args:
        scores: each candidate's data bits per byte, in evaluation order.

    Returns:
        ``(current, best)``: x is the evaluation number (from 1), y bits per byte.
    """
    current = tuple(Point(f"candidate {i}", float(i + 1), float(s)) for i, s in enumerate(scores))
    best, low = [], math.inf
    for point in current:
        low = min(low, point.y)
        best.append(Point(point.label, point.x, low))
    return current, tuple(best)


def plot_tune_progress(scores: Sequence[float], path: str | Path, *, title: str = "fusekit tune",
                       levels: Mapping[str, float] | None = None) -> Path:
    """Draw each candidate's score and the best so far against evaluations to ``path``.

    Args:
        scores: each candidate's data bits per byte, in order.
        path: a ``.png``, ``.svg`` or ``.pdf`` file, written atomically.
        title: the plot's title.
        levels: horizontal reference lines (name → bits per byte), e.g. the uniform merge.

    Returns:
        The file written.
    """
    current, best = tune_progress_series(scores)
    figure, ax = _figure()
    ax.plot([p.x for p in current], [p.y for p in current], "o", color="tab:blue", markersize=3,
            alpha=0.6, label="candidate")
    ax.plot([p.x for p in best], [p.y for p in best], "-", color="tab:orange", linewidth=2,
            label="best so far")
    for index, (name, level) in enumerate((levels or {}).items()):
        ax.axhline(level, color=_COLOURS[(index + 1) % len(_COLOURS)], linestyle="--", linewidth=1,
                   label=name)
    ax.set_xlabel("evaluations")
    ax.set_ylabel("bits per byte on the data (lower is better)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return _save(figure, Path(path))


def _short(label: str, limit: int = 28) -> str:
    return label if len(label) <= limit else "…" + label[-(limit - 1):]


def _matplotlib() -> Any:
    """matplotlib, or one line naming the ``plot`` extra."""
    try:
        import matplotlib
    except ImportError:
        from fusekit.extras import install_hint

        raise FusekitError(f"--plot needs matplotlib; {install_hint('plot')}") from None
    return matplotlib


def _figure() -> tuple[Any, Any]:
    """A figure on the Agg canvas (no display, no pyplot state) and its one axes."""
    _matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=SIZE_INCHES, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure, figure.add_subplot()


def _save(figure: Any, path: Path) -> Path:
    """Write ``figure`` to a sibling temp file, then rename it to ``path``."""
    from fusekit.io.files import atomic_file

    with atomic_file(path) as temp:
        figure.savefig(temp, format=path.suffix.lower().lstrip("."), dpi=DPI)
    return path
