"""``route eval --plot`` and ``ensemble score --plot``: the plotted series equal the reports' numbers,
the files are valid PNGs of the promised size, and a missing matplotlib or a bad path is one line
before any model runs."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from conftest import in_process_cli

from fusekit.errors import FusekitError
from fusekit.plots import (
    DPI,
    SIZE_INCHES,
    check_plot_path,
    ensemble_bar_series,
    plot_ensemble_bars,
    plot_route_curve,
    route_curve_series,
)
from fusekit.route.evaluate import EvalReport, TableRow

pytest.importorskip("matplotlib")

WIDTH, HEIGHT = round(SIZE_INCHES[0] * DPI), round(SIZE_INCHES[1] * DPI)
COSTS = {"small": 1.0, "mid": 1.0, "big": 4.0}


def _row(threshold: float, dear: float, bpb: float) -> TableRow:
    shares = {"small": (1 - dear) / 2, "mid": (1 - dear) / 2, "big": dear}
    return TableRow(threshold, shares, dear, sum(COSTS[n] * s for n, s in shares.items()), bpb, 0.5)


def report(costs: dict[str, float] | None = None) -> EvalReport:
    """A route eval report with distinct, hand-picked numbers (the oracle is cheaper than 'big')."""
    table = [_row(1.0, 0.0, 2.30), _row(0.7, 0.2, 2.10), _row(0.45, 0.55, 1.95), _row(0.0, 1.0, 2.00)]
    return EvalReport(router="r", data="data/test.jsonl", examples=40, threshold=0.45, accuracy=0.6,
                      near_oracle=0.7, accuracy_given=None, accuracy_domain=None, routed=1.95, oracle=1.80,
                      single={"small": 2.30, "mid": 2.35, "big": 2.00}, merge=2.20,
                      merge_models=["small", "mid"], table=table, calibration=[],
                      costs=COSTS if costs is None else costs, oracle_dear_share=0.4, oracle_mean_cost=2.2)


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk, after checking the signature and chunk type."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", head
    width, height = struct.unpack(">II", head[16:24])
    return int(width), int(height)


def test_curve_series_are_the_reports_numbers() -> None:
    rep = report()
    series = route_curve_series(rep)
    assert series.axis == "dear_share"  # two cost levels: the share of dear calls
    assert [(p.x, p.y) for p in series.curve] == [(0.0, 2.30), (0.2, 2.10), (0.55, 1.95), (1.0, 2.00)]
    assert (series.routed.x, series.routed.y) == (0.55, rep.routed)
    assert [(p.label, p.x, p.y) for p in series.singles] == [("small", 0.0, 2.30), ("mid", 0.0, 2.35),
                                                             ("big", 1.0, 2.00)]
    assert series.oracle is not None and (series.oracle.x, series.oracle.y) == (0.4, 1.80)
    assert series.merge == 2.20
    by_cost = route_curve_series(rep, "mean_cost")
    expected = [1.0 * (1 - d) + 4.0 * d for d in (0.0, 0.2, 0.55, 1.0)]
    assert [p.x for p in by_cost.curve] == pytest.approx(expected, abs=1e-12)
    assert [p.x for p in by_cost.singles] == [1.0, 1.0, 4.0] and by_cost.oracle.x == 2.2  # type: ignore[union-attr]
    assert route_curve_series(report({"small": 1, "mid": 2, "big": 4})).axis == "mean_cost"


def test_bar_series_are_the_score_rows() -> None:
    rows = [{"name": "ensemble (prob_avg)", "bits_per_byte": 1.5}, {"name": "a", "bits_per_byte": 1.75},
            {"name": "b", "bits_per_byte": 2.0}]
    assert [(b.label, b.x, b.y) for b in ensemble_bar_series(rows)] == [
        ("ensemble (prob_avg)", 0.0, 1.5), ("a", 1.0, 1.75), ("b", 2.0, 2.0)]


def test_pictures_are_pngs_of_the_promised_size(tmp_path: Path) -> None:
    curve = plot_route_curve(report(), tmp_path / "curve.png")
    bars = plot_ensemble_bars([{"name": "ensemble", "bits_per_byte": 1.5},
                               {"name": "m" * 60, "bits_per_byte": 1.7}], tmp_path / "bars.png")
    assert png_size(curve) == png_size(bars) == (WIDTH, HEIGHT) == (700, 450)
    assert plot_route_curve(report(), tmp_path / "curve.svg").read_text(encoding="utf-8").lstrip().startswith(
        "<?xml")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bars.png", "curve.png", "curve.svg"]  # no temp


@pytest.mark.parametrize(("name", "culprit"), [("curve.jpg", ".png, .svg or .pdf"),
                                               ("missing/curve.png", "does not exist"),
                                               (".", "is a folder")])
def test_bad_plot_paths_are_refused(name: str, culprit: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FusekitError) as info:
        check_plot_path(name)
    assert culprit in str(info.value) and "--plot" in str(info.value) and "\n" not in str(info.value)


@pytest.fixture
def fake_runs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, int]:
    """route eval and ensemble score with their models replaced by fixed reports (counted)."""
    calls = {"eval": 0, "score": 0}

    def evaluate_router(*args: Any, **kwargs: Any) -> EvalReport:
        calls["eval"] += 1
        return report()

    def score(bpb: float, ref: str = "") -> Any:
        return SimpleNamespace(bits_per_byte=bpb, perplexity=2 ** bpb, n_tokens=10, nll_nats=1.0, n_bytes=20)

    def score_ensemble(ens: Any, text: str, context: Any = None) -> Any:
        calls["score"] += 1
        return SimpleNamespace(ensemble=score(1.5), members=[score(1.75), score(2.0)], details={})

    members = [SimpleNamespace(ref="models/a"), SimpleNamespace(ref="models/b")]
    monkeypatch.setattr("fusekit.route.evaluate_router", evaluate_router)
    monkeypatch.setattr("fusekit.route.router.is_arrow_router", lambda folder: False)
    monkeypatch.setattr("fusekit.ensemble.engine.load_ensemble",
                        lambda *a, **k: SimpleNamespace(method="prob_avg", members=members))
    monkeypatch.setattr("fusekit.ensemble.scoring.score_ensemble", score_ensemble)
    monkeypatch.chdir(tmp_path)
    Path("text.txt").write_text("hello world\n", encoding="utf-8")
    return calls


def test_cli_plots_what_it_reports(fake_runs: dict[str, int], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    cli = in_process_cli(capsys)
    code, out, err = cli("route", "eval", "router", "--data", "d.jsonl", "--json", "--plot", "curve.png")
    assert code == 0 and json.loads(out)["routed"] == 1.95 and "curve.png" in err, err
    code, out, err = cli("ensemble", "score", "e.yaml", "--text", "text.txt", "--json", "--plot", "bars.png")
    assert code == 0 and "bars.png" in err, err
    rows = json.loads(out)["rows"]
    assert [(b.label, b.y) for b in ensemble_bar_series(rows)] == [
        ("ensemble (prob_avg)", 1.5), ("models/a", 1.75), ("models/b", 2.0)]
    assert png_size(tmp_path / "curve.png") == png_size(tmp_path / "bars.png") == (WIDTH, HEIGHT)


@pytest.mark.parametrize("args", [["route", "eval", "router", "--data", "d.jsonl", "--plot", "c.png"],
                                  ["ensemble", "score", "e.yaml", "--text", "text.txt", "--plot", "c.png"]])
def test_missing_matplotlib_is_one_line_before_any_model_runs(args: list[str], fake_runs: dict[str, int],
                                                              tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, out, err = in_process_cli(capsys)(*args)
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "matplotlib" in err and "'plot' extra" in err and "Traceback" not in err
    assert fake_runs == {"eval": 0, "score": 0} and not (tmp_path / "c.png").exists()
