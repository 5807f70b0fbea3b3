"""``fusekit route build|eval|run`` end to end, and every bad input exiting 2 with one line."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from fusekit.cli import main
from fusekit.demo import build_demo_models

TEXTS = {"python": ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
                    "class Box:\n    def __init__(self):\n        self.items = []\n",
                    "for i in range(10):\n    total += i\n"],
         "c": ["int add(int a, int b) { return a + b; }\n", "#include <stdio.h>\nstatic int n;\n",
               "for (int i = 0; i < 10; i++) { total += i; }\n", "typedef struct { int x; } point;\n"],
         "prose": ["The river ran quietly past the old mill.\n", "She wrote a letter to her brother.\n",
                   "Permission is hereby granted to any person reading this.\n",
                   "It rained all afternoon, and the garden smelled of earth.\n"]}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_models(tmp_path_factory.mktemp("route-cli"), names=("prose", "c", "python"),
                             hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2)


def cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def data_file(path: Path, label: Callable[[str], str | None] = lambda d: d) -> Path:
    rows = [{"text": t, "domain": d, **({"label": label(d)} if label(d) else {})}
            for d, texts in TEXTS.items() for t in texts]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe(path: Path, models: dict[str, Path], data: Path, extra: str = "labels: given\n") -> Path:
    path.write_text(f"models:\n  - model: {models['prose']}\n    cost: 1\n  - model: {models['c']}\n"
                    f"    cost: 2\n  - model: {models['python']}\n    cost: 3\ndata: {data}\nfolds: 4\n"
                    f"{extra}",
                    encoding="utf-8")
    return path


def test_build_eval_run(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = data_file(tmp_path / "d.jsonl")
    spec = recipe(tmp_path / "r.yaml", models, data, "labels: given\ncalibrate: 0.5\nrouter: logistic\n")
    code, out, err = cli(capsys, "route", "build", spec, tmp_path / "router", "--format", "json")
    assert code == 0, err
    summary = json.loads(out)
    assert summary["models"] == ["prose", "c", "python"] and summary["examples"] == 12
    assert summary["heldout_dear_share"] == pytest.approx(0.5)
    code, out, err = cli(capsys, "route", "build", spec, tmp_path / "router")
    assert code == 2 and "already exists" in err
    code, out, err = cli(capsys, "route", "eval", tmp_path / "router", "--data", data, "--format", "json",
                         "--threshold", "0", "--threshold", "1", "--no-merge")
    assert code == 0, err
    report = json.loads(out)
    assert report["examples"] == 12 and report["merge"] is None
    assert [row["threshold"] for row in report["table"]][0] == 0.0
    assert report["accuracy_given"] is not None and report["accuracy_domain"] == report["accuracy_given"]
    code, out, err = cli(capsys, "route", "run", tmp_path / "router", "--prompt", "def f(x):\n    return x",
                         "--format", "json", "--threshold", "0")
    assert code == 0, err
    assert json.loads(out)["model"] == "python"  # threshold 0: the dearest model
    code, out, _ = cli(capsys, "route", "run", tmp_path / "router", "--prompt", "int x;", "--generate",
                       "--max-new-tokens", "2")
    assert code == 0 and out.split("\t")[0] in ("prose", "c", "python")


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fusekit: error: "), err
    for needle in needles:
        assert needle in lines[0], err


def test_bad_data_files(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    _one_line_error(*cli(capsys, "route", "build", recipe(tmp_path / "a.yaml", models, empty),
                         tmp_path / "o")[::2], "holds no examples")
    bad = data_file(tmp_path / "bad.jsonl")
    bad.write_text(bad.read_text(encoding="utf-8") + '{"text": oops}\n', encoding="utf-8")
    _one_line_error(*cli(capsys, "route", "build", recipe(tmp_path / "b.yaml", models, bad),
                         tmp_path / "o")[::2], "bad.jsonl:13: not valid JSON")
    unknown = data_file(tmp_path / "unknown.jsonl", lambda d: "gpt-9" if d == "c" else d)
    _one_line_error(*cli(capsys, "route", "build", recipe(tmp_path / "c.yaml", models, unknown),
                         tmp_path / "o")[::2], "label 'gpt-9' is not one of the router's models")
    single = data_file(tmp_path / "single.jsonl", lambda d: "c")
    _one_line_error(*cli(capsys, "route", "build", recipe(tmp_path / "d.yaml", models, single),
                         tmp_path / "o")[::2], "all 12 training labels", "no choice for a router to learn")
    _one_line_error(*cli(capsys, "route", "eval", tmp_path / "nowhere", "--data", bad)[::2],
                    "not a fusekit router")
    assert not (tmp_path / "o").exists()


def test_bad_recipes(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = data_file(tmp_path / "d.jsonl")
    spec = tmp_path / "neg.yaml"
    spec.write_text(f"models:\n  - model: {models['c']}\n    cost: -2\ndata: {data}\n", encoding="utf-8")
    _one_line_error(*cli(capsys, "route", "build", spec, tmp_path / "o")[::2], "neg.yaml:3:5 models[0].cost")
    spec = recipe(tmp_path / "feat.yaml", models, data,
                  "labels: given\nfeatures: {type: hidden, model: ./gone}\n")
    _one_line_error(*cli(capsys, "route", "build", spec, tmp_path / "o")[::2], "features.model", "gone")
    spec = recipe(tmp_path / "emb.yaml", models, data,
                  "labels: given\nfeatures: {type: embedding, model: ./gone}\n")
    _one_line_error(*cli(capsys, "route", "build", spec, tmp_path / "o")[::2], "features.model", "gone")
    _one_line_error(*cli(capsys, "route", "run", models["c"], "--prompt", "x")[::2], "not a fusekit router")


def test_route_help_through_the_console_script(run_cli: Callable[..., Any]) -> None:
    proc = run_cli("route", "--help")
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("build", "eval", "run"))


def _dear_share(router_dir: Path, queries: list[str]) -> tuple[float, int]:
    """Share of ``queries`` the saved router sends to c or python (the dearer models), recomputed
    from the router's probabilities with plain Python floats."""
    from fusekit.route import load_router

    router = load_router(router_dir)
    q = router.probabilities(queries).double()
    dear = 0
    for row in q.tolist():
        total = sum(row)
        mixed = [v / total * (1 - 3e-6) + 1e-6 for v in row]  # prose, c, python: cost order
        dear += (mixed[1] + mixed[2]) > router.threshold
    return dear / len(queries), len(queries)


def test_calibrate_on_unlabelled_queries(models: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = data_file(tmp_path / "d.jsonl")
    traffic = tmp_path / "traffic.jsonl"
    queries = [f"x = {i}\nprint(x)\n" if i % 4 == 0 else f"The day {i} was calm.\n" if i % 4 == 1
               else f"int v{i} = {i};\n" for i in range(40)]
    traffic.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in queries), encoding="utf-8")
    spec = recipe(tmp_path / "r.yaml", models, data,
                  f"labels: given\nrouter: logistic\ncalibrate: {{share: 0.25, data: {traffic}}}\n")
    code, _, err = cli(capsys, "route", "build", spec, tmp_path / "router")
    assert code == 0, err
    share, n = _dear_share(tmp_path / "router", queries)
    assert share == pytest.approx(round(0.25 * n) / n)
    info = json.loads((tmp_path / "router" / "router.json").read_text(encoding="utf-8"))
    assert info["calibration"]["data"] == str(traffic) and info["calibration"]["queries"] == 40

    code, out, err = cli(capsys, "route", "calibrate", tmp_path / "router", "--data", traffic, "--share",
                         "0.6", "--format", "json")
    assert code == 0, err
    assert json.loads(out)["share"] == 0.6
    share, n = _dear_share(tmp_path / "router", queries)
    assert share == pytest.approx(round(0.6 * n) / n)
    kept = (tmp_path / "router" / "route.yaml").read_text(encoding="utf-8")
    assert kept == spec.read_text(encoding="utf-8")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".router")]  # no partial left

    code, _, err = cli(capsys, "route", "calibrate", tmp_path / "router", "--data", traffic, "--share",
                       "0.1", "--out", tmp_path / "router-10")
    assert code == 0, err
    assert _dear_share(tmp_path / "router-10", queries)[0] == pytest.approx(0.1)
    assert _dear_share(tmp_path / "router", queries)[0] == pytest.approx(0.6)  # left as it was
    _one_line_error(*cli(capsys, "route", "calibrate", tmp_path / "router", "--data", traffic, "--share",
                         "0.1", "--out", tmp_path / "router-10")[::2], "already exists")
    _one_line_error(*cli(capsys, "route", "calibrate", tmp_path / "router", "--data", traffic, "--share",
                         "1.5")[::2], "--share 1.5")
    _one_line_error(*cli(capsys, "route", "calibrate", tmp_path / "router", "--data", tmp_path / "no.jsonl",
                         "--share", "0.5")[::2], "no.jsonl", "not found")
    _one_line_error(*cli(capsys, "route", "calibrate", models["c"], "--data", traffic, "--share",
                         "0.5")[::2], "not a fusekit router")
    same = tmp_path / "same.yaml"
    two = data_file(tmp_path / "two.jsonl", lambda d: "prose" if d == "prose" else "c")
    same.write_text(f"models:\n  - model: {models['prose']}\n  - model: {models['c']}\ndata: {two}\n"
                    "labels: given\nfolds: 0\n", encoding="utf-8")
    code, _, err = cli(capsys, "route", "build", same, tmp_path / "same")
    assert code == 0, err
    _one_line_error(*cli(capsys, "route", "calibrate", tmp_path / "same", "--data", traffic, "--share",
                         "0.5")[::2], "same cost")
    spec = recipe(tmp_path / "r2.yaml", models, data,
                  f"labels: given\ncalibrate: {{share: 0.5, data: {tmp_path / 'gone.jsonl'}}}\n")
    _one_line_error(*cli(capsys, "route", "build", spec, tmp_path / "o")[::2], "gone.jsonl", "not found")
    assert not (tmp_path / "o").exists()


def test_run_routes_a_file_like_one_prompt_at_a_time(models: dict[str, Path], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from fusekit.route import run_router

    data = data_file(tmp_path / "d.jsonl")
    spec = recipe(tmp_path / "r.yaml", models, data, "labels: given\n")
    assert cli(capsys, "route", "build", spec, tmp_path / "router")[0] == 0
    queries = tmp_path / "q.jsonl"
    prompts = ["def area(r):\n    return 3.14 * r * r\n", "The garden was quiet.", "static int n = 3;"]
    queries.write_text("\n".join(json.dumps({"prompt": p}) for p in prompts) + "\n\n", encoding="utf-8")
    code, out, err = cli(capsys, "route", "run", tmp_path / "router", "--data", queries, "--generate",
                         "--max-new-tokens", "3", "--threshold", "0.3")
    assert code == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    assert [r["line"] for r in records] == [1, 2, 3]
    for prompt, record in zip(prompts, records, strict=True):
        alone = run_router(tmp_path / "router", prompt, generate=True, max_new_tokens=3, threshold=0.3)
        assert record["model"] == alone.decision.model.name and record["answer"] == alone.answer
        assert record["probabilities"] == pytest.approx(alone.decision.probabilities, abs=1e-6)
    _one_line_error(*cli(capsys, "route", "run", tmp_path / "router")[::2], "--prompt TEXT or --data FILE")
    _one_line_error(*cli(capsys, "route", "run", tmp_path / "router", "--prompt", "x", "--data",
                         queries)[::2], "either --prompt")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"completion": "x"}\n', encoding="utf-8")
    _one_line_error(*cli(capsys, "route", "run", tmp_path / "router", "--data", bad)[::2],
                    "bad.jsonl:1: needs 'text' or 'prompt'")
