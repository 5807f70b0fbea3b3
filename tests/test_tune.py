"""``fusekit tune`` end to end on tiny models: the search loop, best.yaml reproduced by ``fusekit merge``,
a real local Ray with two workers, kill -9 and ``--resume``, the reports, and one-line refusals."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import in_process_cli, load_weights

from fusekit.errors import FusekitError
from fusekit.plots import tune_progress_series

pytestmark = pytest.mark.usefixtures("one_torch_thread")

DATA = ("def add(a, b):\n    return a + b\n\nThe cat sat on the mat and looked at the door.\n" * 6)
TEST = "int main(void) { return 0; }\nA dog ran in the park after the red ball.\n" * 4


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, tokenizer_models: dict[str, Path]) -> Path:
    root = tmp_path_factory.mktemp("tune")
    (root / "data.txt").write_text(DATA, encoding="utf-8")
    (root / "test.txt").write_text(TEST, encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    for name, folder in tokenizer_models.items():
        (root / name).symlink_to(folder)
    return root


def recipe(root: Path, name: str, *, optimizer: str = "random", evaluations: int = 6,
           data: str = "data.txt", extra: str = "") -> Path:
    """A linear merge of math and code with both weights searched."""
    text = f"""\
models:
  - model: {root / 'math'}
    parameters:
      weight: {{search: [0.1, 1]}}
  - model: {root / 'code'}
    parameters:
      weight: {{search: [0.1, 1]}}
merge_method: linear
dtype: float32
tune:
  data: {root / data}
  test: {root / 'test.txt'}
  optimizer: {optimizer}
  budget: {{evaluations: {evaluations}}}
  seed: 3
  population: 2
{extra}"""
    path = root / name
    path.write_text(text, encoding="utf-8")
    return path


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def random_run(tree: Path) -> Path:
    """One uninterrupted random search (1 worker, in this process) the other tests compare with."""
    from fusekit.tune import tune

    out = tree / "random-1"
    tune(recipe(tree, "random.yaml"), out)
    return out


def test_random_search_writes_every_candidate_and_a_report(random_run: Path, tree: Path) -> None:
    rows = lines(random_run / "candidates.jsonl")
    assert [r["index"] for r in rows] == list(range(6))
    assert rows[0]["point"] == [0.5, 0.5]  # the default (uniform) point comes first
    assert all(math.isfinite(r["score"]) and r["worker"] for r in rows)
    report = json.loads((random_run / "report.json").read_text(encoding="utf-8"))
    best = min(rows, key=lambda r: (r["score"], r["index"]))
    assert report["best"]["index"] == best["index"] and report["partial"] is False
    kinds = [r["kind"] for r in report["rows"]]
    assert kinds[:3] == ["tuned", "default", "uniform"] and kinds.count("single") == 2
    assert kinds[-1] == "ensemble"
    tuned, default, uniform = report["rows"][:3]
    assert tuned["data_bpb"] == best["score"] and default["data_bpb"] == rows[0]["score"]
    # equal weights: the default point is the uniform linear merge, scored on the test text by both
    assert default["test_bpb"] == pytest.approx(uniform["test_bpb"], rel=1e-6)
    assert json.loads((random_run / "state.json").read_text())["partial"] is False
    assert (random_run / "progress.png").stat().st_size > 1000
    assert "| tuned merge |" in (random_run / "report.md").read_text(encoding="utf-8")


def test_merge_of_best_yaml_reproduces_the_best_candidate(random_run: Path, tree: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    from fusekit.lm.load import load_lm
    from fusekit.lm.score import score_texts
    from fusekit.tune.evaluate import total_score

    best = json.loads((random_run / "report.json").read_text(encoding="utf-8"))["best"]
    run = in_process_cli(capsys)
    code, _, err = run("merge", str(random_run / "best.yaml"), str(tree / "best-merged"), "--quiet")
    assert code == 0, err
    merged = load_weights(tree / "best-merged")
    weights = yaml.safe_load((random_run / "best.yaml").read_text())["models"]
    w = [float(m["parameters"]["weight"]) for m in weights]
    assert list(best["parameters"].values()) == w
    a, b = load_weights(tree / "math"), load_weights(tree / "code")
    for name, tensor in merged.items():  # float64 reference of a normalised linear merge
        ref = (w[0] * a[name].double() + w[1] * b[name].double()) / (w[0] + w[1])
        torch.testing.assert_close(tensor.double(), ref, rtol=1e-6, atol=1e-6)
    score = total_score(score_texts(load_lm(tree / "best-merged"), [DATA]))
    assert score == pytest.approx(best["score"], rel=1e-6)


def test_cma_search_never_reports_worse_than_its_default(tree: Path) -> None:
    from fusekit.tune import tune

    result = tune(recipe(tree, "cma.yaml", optimizer="cma", evaluations=6), tree / "cma")
    scores = [c.score for c in result.candidates]
    assert len(scores) == 6 and result.best.score == min(scores) <= scores[0]
    assert result.recipe == yaml.safe_load((tree / "cma" / "best.yaml").read_text())
    current, best = tune_progress_series(scores)
    assert [p.y for p in current] == scores
    assert all(x.y >= y.y for x, y in zip(best, best[1:], strict=False))


def test_two_ray_workers_give_the_same_result_as_one(random_run: Path, tree: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("ray")
    run = in_process_cli(capsys)
    code, _, err = run("tune", str(tree / "random.yaml"), str(tree / "random-ray"), "--workers", "2",
                       "--quiet")
    assert code == 0, err
    one, two = lines(random_run / "candidates.jsonl"), lines(tree / "random-ray" / "candidates.jsonl")
    assert [r["score"] for r in two] == pytest.approx([r["score"] for r in one], rel=1e-9)
    assert [r["key"] for r in two] == [r["key"] for r in one]
    assert (tree / "random-ray" / "best.yaml").read_text() == (random_run / "best.yaml").read_text()
    assert len({r["worker"] for r in two}) >= 1 and all(r["worker"] != "" for r in two)


def _cli(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "fusekit", *map(str, args)]


def test_kill_9_then_resume_reaches_the_uninterrupted_result(tree: Path) -> None:
    from fusekit.tune import tune

    path = recipe(tree, "resume.yaml", evaluations=12)
    whole = tune(path, tree / "whole")
    out = tree / "killed"
    env = {**os.environ, "CI": "1"}
    process = subprocess.Popen(_cli("tune", path, out, "--quiet"), env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        summary = out / "state.json"
        if summary.is_file() and json.loads(summary.read_text() or "{}").get("generation", 0) >= 2:
            break
        time.sleep(0.02)
    assert process.poll() is None, "the search ended before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (out / "best.yaml").exists()
    with pytest.raises(FusekitError, match="unfinished search; continue it with --resume"):
        tune(path, out)
    resumed = tune(path, out, resume=True)
    assert [c.score for c in resumed.candidates] == [c.score for c in whole.candidates]
    assert [r["key"] for r in lines(out / "candidates.jsonl")] == [c.key for c in whole.candidates]
    assert (out / "best.yaml").read_text() == (tree / "whole" / "best.yaml").read_text()


@pytest.mark.parametrize(("case", "args", "message"), [
    ("empty data", ("empty",), "empty.txt"),
    ("budget 0", ("zero",), "budget"),
    ("unreachable ray", ("ok", "--ray-address", "127.0.0.1:1"), "127.0.0.1:1"),
])
def test_bad_input_is_one_line_and_writes_nothing(case: str, args: tuple[str, ...], message: str, tree: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    paths = {"empty": recipe(tree, "bad-empty.yaml", data="empty.txt"),
             "zero": recipe(tree, "bad-zero.yaml", evaluations=0),
             "ok": recipe(tree, "bad-ok.yaml")}
    out = tree / f"bad-{case.replace(' ', '-')}"
    started = time.monotonic()
    code, _, err = in_process_cli(capsys)("tune", str(paths[args[0]]), str(out), *args[1:], "--quiet")
    assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert time.monotonic() - started < 10
    assert not out.exists()


def test_an_existing_output_is_refused_without_resume_or_overwrite(
        random_run: Path, tree: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run: Callable[..., tuple[int, str, str]] = in_process_cli(capsys)
    code, _, err = run("tune", str(tree / "random.yaml"), str(random_run), "--quiet")
    assert code == 2 and "--overwrite" in err and len(err.strip().splitlines()) == 1
    stray = tree / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("mine")
    code, _, err = run("tune", str(tree / "random.yaml"), str(stray), "--overwrite", "--quiet")
    assert code == 2 and (stray / "notes.txt").read_text() == "mine"


def test_ensemble_recipe_gets_learned_weights(tree: Path) -> None:
    from fusekit.select.mixture import member_token_logprobs, mixture_bpb
    from fusekit.tune import tune

    path = tree / "ensemble.yaml"
    path.write_text(f"""\
models:
  - model: {tree / 'math'}
  - model: {tree / 'code'}
method: prob_avg
tune:
  data: {tree / 'data.txt'}
  test: {tree / 'test.txt'}
  budget: {{evaluations: 2}}
""", encoding="utf-8")
    result = tune(path, tree / "ens")
    best = yaml.safe_load((tree / "ens" / "best.yaml").read_text())
    weights = [m["parameters"]["weight"] for m in best["models"]]
    assert best["method"] == "prob_avg" and "tune" not in best
    from fusekit.ensemble import load_ensemble_recipe

    parsed, _ = load_ensemble_recipe(tree / "ens" / "best.yaml")  # a valid ensemble recipe
    assert [m.share for m in parsed.models] == weights
    lp = member_token_logprobs([str(tree / "math"), str(tree / "code")], [DATA])
    assert mixture_bpb(lp, weights) <= mixture_bpb(lp, [0.5, 0.5]) + 1e-12
    assert result.best.score == pytest.approx(mixture_bpb(lp, weights), rel=1e-6)


def test_adam_search_steps_are_candidates_and_its_best_is_rescored_by_a_real_merge(tree: Path) -> None:
    from fusekit.tune import tune

    result = tune(recipe(tree, "adam.yaml", optimizer="adam", evaluations=3,
                         extra="  learning_rate: 0.5\n"), tree / "adam")
    assert [c.generation for c in result.candidates] == [0, 1, 2]
    assert len({c.point for c in result.candidates}) == 3  # every step moved the weights
    tuned = result.report["rows"][0]
    assert tuned["kind"] == "tuned" and math.isfinite(tuned["test_bpb"])


def test_the_reports_ensemble_row_is_what_the_ensemble_scorer_measures(tree: Path) -> None:
    from fusekit.ensemble import load_ensemble, parse_ensemble_recipe, score_ensemble
    from fusekit.tune.report import _ensemble_score

    refs = [str(tree / "math"), str(tree / "code")]
    text = "models:\n" + "".join(f"  - model: {ref}\n" for ref in refs) + "method: prob_avg\n"
    ensemble = load_ensemble(parse_ensemble_recipe(text)[0])
    expected = score_ensemble(ensemble, TEST, members=False).ensemble.bits_per_byte
    assert _ensemble_score(refs, [TEST], "cpu") == pytest.approx(expected, rel=1e-6)
