"""One way to say an option: every command takes the shared options with the same flags and help.

The library behind each command is replaced by a fake that records its arguments and returns fixed
results, so these tests check the command line itself: ``--json`` and ``--format json`` print the same
report, ``--device`` reaches the library as given, ``--seed`` and ``--random-seed`` are one option, and
a bad value ends with exit status 2 and one line on stderr.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from fusekit.cli import main

COMMAND_MODULES = ("cache", "ensemble", "hub", "lora", "merge", "moe", "route", "schema", "score", "select",
                   "serve", "tune")

# Each command that prints a report: its arguments (the library is faked, so nothing needs to exist)
# and a (key, value) its JSON report must hold.
REPORTS: dict[str, tuple[list[str], str, Any]] = {
    "merge": (["merge", "r.yaml", "out"], "tensors", 7),
    "plan": (["plan", "r.yaml"], "tensors", 7),
    "moe": (["moe", "r.yaml", "out"], "gate_mode", "random"),
    "score": (["score", "m1", "--text", "t.txt"], "n_tokens", 2),
    "ensemble generate": (["ensemble", "generate", "r.yaml", "--prompt", "hi"], "stats", {"tokens": 7}),
    "ensemble score": (["ensemble", "score", "r.yaml", "--text", "t.txt"], "bytes", 4),
    "ensemble check": (["ensemble", "check", "r.yaml"], "problems", []),
    "route build": (["route", "build", "r.yaml", "out"], "examples", 7),
    "route eval": (["route", "eval", "router", "--data", "d.jsonl"], "examples", 7),
    "route calibrate": (["route", "calibrate", "router", "--data", "d.jsonl", "--share", "0.5"],
                        "queries", 7),
    "route run": (["route", "run", "router", "--prompt", "hi"], "model", "a"),
    "push": (["push", "out", "org/name"], "repo_id", "org/name"),
    "lora extract": (["lora", "extract", "out", "--base", "b", "--model", "m", "-r", "2"],
                     "total_relative_error", 0.5),
    "cache info": (["cache", "info"], "folder", os.environ.get("FUSEKIT_CACHE")),  # set by conftest
    "tune": (["tune", "r.yaml", "out"], "evaluations", 7),
    "select": (["select", "a", "b", "--data", "d.txt", "-k", "1", "-o", "s.yaml"], "score", 1.5),
    "ensemble learn-weights": (["ensemble", "learn-weights", "r.yaml", "--data", "d.txt", "-o", "w.yaml"],
                               "after_bpb", 1.0),
}
# Commands that print no report; listed so that a new command cannot be forgotten.
OTHER_COMMANDS: dict[str, list[str]] = {"cache clear": ["cache", "clear"], "schema": ["schema", "merge"],
                                        "validate": ["validate", "r.yaml"],
                                        "serve": ["serve", "m1", "--port", "0"]}


def _leaf_commands() -> dict[str, Any]:
    """Every command of the app by its path ("route run"), as the parsed command objects."""
    from typer.main import get_command

    for name in COMMAND_MODULES:
        importlib.import_module(f"fusekit.cli.{name}")
    from fusekit.cli.app import app

    found: dict[str, Any] = {}

    def walk(command: Any, path: str) -> None:
        found[path] = command
        for name, sub in getattr(command, "commands", {}).items():
            walk(sub, f"{path} {name}".strip())

    walk(get_command(app), "")
    return found


def _options(command: Any) -> dict[str, Any]:
    return {opt: param for param in command.params for opt in getattr(param, "opts", [])}


def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(argv)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


# -- the fake library -----------------------------------------------------------------------------


def _recorder(calls: list[tuple[str, dict[str, Any]]], name: str, result: Any) -> Any:
    def fake(*args: Any, **kwargs: Any) -> Any:
        calls.append((name, kwargs))
        return result() if callable(result) else result

    return fake


def _fake_results() -> dict[str, Any]:
    stats = SimpleNamespace(tensors=7, bytes_read=10, bytes_written=20, files=["a"], seconds=1.5,
                            peak_rss_bytes=100)
    text_score = SimpleNamespace(n_bytes=4, n_tokens=2, nll_nats=1.0, bits_per_byte=0.36, perplexity=1.6)
    router = SimpleNamespace(info={"training": {"examples": 7}, "calibration": {"queries": 7}},
                             names=["a", "b"], featurizer=SimpleNamespace(kind="tfidf"),
                             fitted=SimpleNamespace(kind="knn"), threshold=0.5, dear_indices=lambda: [1])
    answer = SimpleNamespace(prompt="hi", text=" there", new_tokens=1, finished=True, candidates=None)
    tune_report = {"evaluations": 7, "optimizer": "cma", "scored_on": "test",
                   "best": {"index": 0, "score": 1.0},
                   "rows": [{"name": "tuned merge", "kind": "tuned", "data_bpb": 1.0, "test_bpb": 1.1}]}
    return {
        "tune": SimpleNamespace(report=tune_report),
        "select": SimpleNamespace(score=1.5, members=["a"], to_json=lambda: {"score": 1.5},
                                  text_lines=lambda: ["step 1: a 1.5000"]),
        "learned": SimpleNamespace(recipe_text="models: []\n", refs=["a"], before=[1.0], after=[1.0],
                                   before_bpb=1.0, after_bpb=1.0, to_json=lambda: {"after_bpb": 1.0}),
        "merge": SimpleNamespace(stats=stats, up_to_date=False, kept_shards=0, seed=None, stages=[],
                                 out_dir=Path("out"),
                                 plan=SimpleNamespace(recipe=SimpleNamespace(merge_method="linear"),
                                                      models=["a", "b"])),
        "moe": SimpleNamespace(stats=stats, seed=3, moe_plan=SimpleNamespace(
            architecture="MixtralForCausalLM", recipe=SimpleNamespace(experts=[1, 2], gate_mode="random"))),
        "text_score": text_score,
        "generation": SimpleNamespace(answers=[answer], summary=lambda: {"tokens": 7}),
        "ensemble_score": SimpleNamespace(ensemble=text_score, members=[text_score], details={}),
        "build": SimpleNamespace(router=router, seconds=1.0),
        "router": router,
        "eval": SimpleNamespace(to_dict=lambda: {"examples": 7}, format_text=lambda: "a table"),
        "run": SimpleNamespace(decision=SimpleNamespace(model=SimpleNamespace(name="a", ref="r", cost=1),
                                                        threshold=0.5, probabilities={"a": 1.0}),
                               seconds_routing=0.001, answer=None),
        "push": SimpleNamespace(repo_id="org/name", revision="main", commit_url="https://hub/c/1", files=3,
                                attempts=1, up_to_date=False),
        "extract": SimpleNamespace(modules=[SimpleNamespace(module="q", shape=(4, 4), kind="lora", rank=2,
                                                            relative_error=0.5)],
                                   total_relative_error=0.5, out_dir="out", seconds=1.0,
                                   as_dict=lambda: {"total_relative_error": 0.5}),
    }


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[str, dict[str, Any]]]]:
    """Replace every library function the commands call; yield the list of (function, kwargs) calls."""
    record: list[tuple[str, dict[str, Any]]] = []
    r = _fake_results()

    def ensemble(*args: Any, **kwargs: Any) -> Any:
        record.append(("load_ensemble", kwargs))
        generate = _recorder(record, "generate", r["generation"])
        return SimpleNamespace(method="union", members=[SimpleNamespace(ref="m1")], generate=generate)

    fakes = {
        "fusekit.merging.merge": _recorder(record, "merge", r["merge"]),
        "fusekit.merging.plan_merge": _recorder(record, "plan_merge", "a plan"),
        "fusekit.moe.recipe.is_moe_recipe": lambda recipe: False,
        "fusekit.plan.report.plan_summary": lambda plan, **limits: {"tensors": 7, **limits},
        "fusekit.plan.report.format_plan": lambda plan, verbose, **limits: "a plan, as text",
        "fusekit.moe.run_moe": _recorder(record, "run_moe", r["moe"]),
        "fusekit.lm.load.load_lm": _recorder(record, "load_lm", object()),
        "fusekit.lm.score.read_text_file": lambda path: "text",
        "fusekit.lm.score.score_text": _recorder(record, "score_text", r["text_score"]),
        "fusekit.ensemble.engine.load_ensemble": ensemble,
        "fusekit.ensemble.scoring.score_ensemble": _recorder(record, "score_ensemble", r["ensemble_score"]),
        "fusekit.ensemble.check.check_ensemble": lambda recipe: {"problems": [], "members": 2},
        "fusekit.ensemble.check.format_report": lambda report: "a report, as text",
        "fusekit.route.build_router": _recorder(record, "build_router", r["build"]),
        "fusekit.route.evaluate_router": _recorder(record, "evaluate_router", r["eval"]),
        "fusekit.route.calibration.recalibrate_router": _recorder(record, "recalibrate_router", r["router"]),
        "fusekit.route.run_router": _recorder(record, "run_router", r["run"]),
        "fusekit.io.hub.push_to_hub": _recorder(record, "push_to_hub", r["push"]),
        "fusekit.lora.extract.extract_lora": _recorder(record, "extract_lora", r["extract"]),
        "fusekit.tune.search.tune": _recorder(record, "tune", r["tune"]),
        "fusekit.select.data.read_data_texts": lambda path: ["text"],
        "fusekit.select.run.select_experts": _recorder(record, "select_experts", r["select"]),
        "fusekit.select.recipes.write_recipe": _recorder(record, "write_recipe", None),
        "fusekit.select.learned.learn_recipe_weights": _recorder(record, "learn_recipe_weights",
                                                                 r["learned"]),
        "fusekit.serve.server.serve": _recorder(record, "serve", None),
    }
    for target, fake in fakes.items():
        monkeypatch.setattr(target, fake)
    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    yield record


# -- every command is covered ---------------------------------------------------------------------


def test_the_tables_name_every_command() -> None:
    leaves = {path for path, command in _leaf_commands().items() if not hasattr(command, "commands")}
    assert leaves == set(REPORTS) | set(OTHER_COMMANDS)


@pytest.mark.parametrize("path", sorted(REPORTS))
def test_every_report_command_takes_both_spellings(path: str) -> None:
    options = _options(_leaf_commands()[path])
    assert "--json" in options and "--format" in options
    assert options["--json"].help == "Same as --format json."


def test_every_command_and_group_has_an_example_epilog() -> None:
    for path, command in _leaf_commands().items():
        assert (command.epilog or "").startswith("Example: fusekit "), f"'{path or 'fusekit'}' has no example"


def test_device_is_one_option_with_one_help_text() -> None:
    devices = {path: _options(command)["--device"] for path, command in _leaf_commands().items()
               if "--device" in _options(command)}
    assert set(devices) == {"merge", "moe", "score", "ensemble generate", "ensemble score", "route build",
                            "route eval", "route run", "lora extract", "tune", "select",
                            "ensemble learn-weights", "serve"}
    helps = {param.help for param in devices.values()}
    assert len(helps) == 1 and "cpu, cuda, or auto" in helps.pop()
    assert {param.opts[0] for param in devices.values()} == {"--device"}


def test_seed_has_both_names_wherever_it_is_taken() -> None:
    seeds = {path: _options(command) for path, command in _leaf_commands().items()
             if "--seed" in _options(command) or "--random-seed" in _options(command)}
    assert set(seeds) == {"merge", "moe", "ensemble generate"}
    for options in seeds.values():
        assert options["--seed"] is options["--random-seed"]


# -- what the commands print ----------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(REPORTS))
def test_json_and_format_json_print_the_same_report(path: str, calls: list[Any], tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    argv, key, value = REPORTS[path]
    code, as_json, err = _run(capsys, [*argv, "--json"])
    assert code == 0, err
    code, format_json, err = _run(capsys, [*argv, "--format", "json"])
    assert code == 0, err
    assert as_json == format_json
    report = json.loads(as_json)
    assert (report[0] if isinstance(report, list) else report)[key] == value
    code, text, err = _run(capsys, argv)
    assert code == 0, err
    assert text.strip() and text != as_json


@pytest.mark.parametrize("device", ["cpu", "cuda", "auto"])
@pytest.mark.parametrize("path", ["merge", "moe", "score", "ensemble generate", "ensemble score",
                                  "route build", "route eval", "route run", "lora extract", "tune"])
def test_device_reaches_the_library(path: str, device: str, calls: list[tuple[str, dict[str, Any]]],
                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, [*REPORTS[path][0], "--device", device])
    assert code == 0, err
    assert [kwargs["device"] for _, kwargs in calls if "device" in kwargs] == [device]


@pytest.mark.parametrize("flag", ["--seed", "--random-seed"])
@pytest.mark.parametrize(("path", "function", "argument"), [
    ("merge", "merge", "random_seed"), ("moe", "run_moe", "random_seed"),
    ("ensemble generate", "generate", "seed")])
def test_both_seed_spellings_reach_the_library(path: str, function: str, argument: str, flag: str,
                                               calls: list[tuple[str, dict[str, Any]]], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(capsys, [*REPORTS[path][0], flag, "41"])
    assert code == 0, err
    assert [kwargs[argument] for name, kwargs in calls if name == function] == [41]


# -- bad values -------------------------------------------------------------------------------------


def _bad_value_cases() -> Iterator[Any]:
    commands = {**{path: argv for path, (argv, _, _) in REPORTS.items()}, **OTHER_COMMANDS}
    leaves = _leaf_commands()
    for path, argv in sorted(commands.items()):
        options = _options(leaves[path])
        for option, value in (("--device", "tpu"), ("--format", "xml"), ("--batch-size", "0"),
                              ("--seed", "abc"), ("--threads", "0")):
            if option in options:
                yield pytest.param([*argv, option, value], option, value, id=f"{path}{option}={value}")


@pytest.mark.parametrize(("argv", "option", "value"), list(_bad_value_cases()))
def test_bad_values_exit_2_with_one_line(argv: list[str], option: str, value: str,
                                         calls: list[tuple[str, dict[str, Any]]], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(capsys, argv)
    assert code == 2
    assert out == "" and calls == []
    assert len(err.strip().splitlines()) == 1 and err.startswith("fusekit: error: "), err
    assert option in err and value in err and "--help" in err, err


def test_unknown_option_is_one_line_naming_the_command(capsys: pytest.CaptureFixture[str],
                                                       calls: list[Any]) -> None:
    code, out, err = _run(capsys, ["route", "run", "router", "--jsn"])
    assert code == 2 and out == ""
    line = err.strip()
    assert line.startswith("fusekit: error: No such option: --jsn") and "\n" not in line, line
    assert line.endswith("(see: fusekit route run --help)"), line
