"""The bad-inputs corpus for the commands other than ``fusekit merge``: score, ensemble, route, moe,
push and plan. Every case runs through the real CLI entry point in this process and must give exit 2,
one stderr line ``fusekit: error: ...`` naming the culprit, no traceback, and write nothing.

Valid recipes, data, a merged output and a built router are made once per module from the session's
``tokenizer_models``; each case breaks one thing. Placeholders in arguments: ``{T}`` is that shared
tree, ``{base}``/``{math}`` are the model folders; the case runs in an empty folder of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from conftest import in_process_cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class Case(NamedTuple):
    args: list[str]
    culprit: str
    env: dict[str, str] = {}


ENS = ["ensemble", "generate", "{T}/ens.yaml", "--prompt", "hi", "--max-new-tokens", "1"]
ENS_SCORE = ["ensemble", "score", "{T}/ens.yaml", "--text", "{T}/text.txt"]
SCORE = ["score", "{base}", "--text", "{T}/text.txt"]
EVAL = ["route", "eval", "{T}/router", "--data", "{T}/data.jsonl", "--no-merge"]
RUN = ["route", "run", "{T}/router", "--prompt", "def f(x):"]
CALIBRATE = ["route", "calibrate", "{T}/router", "--data", "{T}/data.jsonl", "--share", "0.5",
             "--out", "calibrated"]

LONG = "z" * 300  # longer than any file name the system takes
CASES: dict[str, Case] = {
    # -- fusekit score ---------------------------------------------------------------------------
    "score/text_missing": Case(["score", "{base}", "--text", "missing.txt"], "missing.txt"),
    "score/text_path_too_long": Case(["score", "{base}", "--text", LONG], "File name too long"),
    "score/model_path_too_long": Case(["score", LONG, "--text", "{T}/text.txt"], "cannot be used"),
    "ensemble/prompts_path_too_long": Case(["ensemble", "generate", "{T}/ens.yaml", "--prompts", LONG],
                                           "File name too long"),
    "route/data_path_too_long": Case(["route", "eval", "{T}/router", "--data", LONG], "too long"),
    "push/folder_path_too_long": Case(["push", LONG, "org/name"], "File name too long"),
    "merge/out_name_too_long": Case(["merge", "{T}/merge.yaml", LONG], "longer than 200 bytes"),
    "score/text_is_folder": Case(["score", "{base}", "--text", "{T}/textdir"], "textdir"),
    "score/text_is_fifo": Case(["score", "{base}", "--text", "{T}/fifo"], "fifo"),
    "score/text_dev_zero": Case(["score", "{base}", "--text", "/dev/zero"], "/dev/zero"),
    "score/text_empty": Case(["score", "{base}", "--text", "{T}/empty.txt"], "empty.txt"),
    "score/text_not_utf8": Case(["score", "{base}", "--text", "{T}/latin1.txt"], "latin1.txt"),
    "score/batch_size_zero": Case([*SCORE, "--batch-size", "0"], "--batch-size"),
    "score/context_zero": Case([*SCORE, "--context", "0"], "--context"),
    "score/stride_zero": Case([*SCORE, "--stride", "0"], "stride 0"),
    "score/model_missing": Case(["score", "{T}/no-such-model", "--text", "{T}/text.txt"],
                                "no-such-model"),
    "score/model_truncated": Case(["score", "{T}/bad/truncated", "--text", "{T}/text.txt"],
                                  "truncated"),
    "score/model_without_config": Case(["score", "{T}/bad/noconfig", "--text", "{T}/text.txt"],
                                       "noconfig"),
    "score/model_config_not_json": Case(["score", "{T}/bad/badconfig", "--text", "{T}/text.txt"],
                                        "badconfig"),
    "score/model_is_a_file": Case(["score", "{T}/text.txt", "--text", "{T}/text.txt"], "text.txt"),
    # -- fusekit ensemble generate ---------------------------------------------------------------
    "ensemble/prompts_line_without_prompt": Case(["ensemble", "generate", "{T}/ens.yaml", "--prompts",
                                                  "{T}/noprompt.jsonl"], "noprompt.jsonl"),
    "ensemble/prompts_line_not_json": Case(["ensemble", "generate", "{T}/ens.yaml", "--prompts",
                                            "{T}/notjson.jsonl"], "notjson.jsonl"),
    "ensemble/prompts_line_too_long": Case(["ensemble", "generate", "{T}/ens.yaml", "--prompts",
                                            "{T}/long.jsonl"], "FUSEKIT_MAX_LINE_BYTES",
                                           {"FUSEKIT_MAX_LINE_BYTES": "1KB"}),
    "ensemble/prompts_empty": Case(["ensemble", "generate", "{T}/ens.yaml", "--prompts",
                                    "{T}/empty.jsonl"], "empty.jsonl"),
    "ensemble/prompts_missing": Case(["ensemble", "generate", "{T}/ens.yaml", "--prompts",
                                      "missing.jsonl"], "missing.jsonl"),
    "ensemble/prompts_fifo": Case(["ensemble", "generate", "{T}/ens.yaml", "--prompts", "{T}/fifo"],
                                  "fifo"),
    "ensemble/no_prompt": Case(["ensemble", "generate", "{T}/ens.yaml"], "--prompt"),
    "ensemble/out_is_folder": Case([*ENS, "--out", "{T}/textdir"], "textdir"),
    "ensemble/out_in_missing_folder": Case([*ENS, "--out", "nowhere/answers.jsonl"], "nowhere"),
    "ensemble/seed_2_70": Case([*ENS, "--seed", str(2**70)], "--seed"),
    "ensemble/seed_below_torch_range": Case([*ENS, "--seed", str(-2**64)], "--seed"),
    "ensemble/temperature_nan": Case([*ENS, "--temperature", "nan"], "--temperature"),
    "ensemble/temperature_negative": Case([*ENS, "--temperature", "-1"], "--temperature"),
    "ensemble/temperature_inf": Case([*ENS, "--temperature", "inf"], "--temperature"),
    "ensemble/max_new_tokens_zero": Case([*ENS[:-1], "0"], "--max-new-tokens"),
    "ensemble/batch_size_zero": Case([*ENS, "--batch-size", "0"], "--batch-size"),
    "ensemble/member_truncated": Case(["ensemble", "generate", "{T}/ens_truncated.yaml", "--prompt",
                                       "hi", "--max-new-tokens", "1"], "truncated"),
    "ensemble/member_missing": Case(["ensemble", "generate", "{T}/ens_missing.yaml", "--prompt", "hi"],
                                    "no-such-model"),
    "ensemble/unknown_method": Case(["ensemble", "generate", "{T}/ens_method.yaml", "--prompt", "hi"],
                                    "ens_method.yaml"),
    "ensemble/key_typo": Case(["ensemble", "generate", "{T}/ens_typo.yaml", "--prompt", "hi"],
                              "ens_typo.yaml"),
    "ensemble/weight_negative": Case(["ensemble", "generate", "{T}/ens_negative.yaml", "--prompt",
                                      "hi"], "weight"),
    "ensemble/weight_nan": Case(["ensemble", "generate", "{T}/ens_nan.yaml", "--prompt", "hi"],
                                "weight"),
    "ensemble/recipe_is_folder": Case(["ensemble", "generate", "{T}/textdir", "--prompt", "hi"],
                                      "textdir"),
    "ensemble/recipe_dev_zero": Case(["ensemble", "generate", "/dev/zero", "--prompt", "hi"],
                                     "/dev/zero"),
    # -- fusekit ensemble score / check ----------------------------------------------------------
    "ensemble_score/text_missing": Case(["ensemble", "score", "{T}/ens.yaml", "--text", "missing.txt"],
                                        "missing.txt"),
    "ensemble_score/text_fifo": Case(["ensemble", "score", "{T}/ens.yaml", "--text", "{T}/fifo"],
                                     "fifo"),
    "ensemble_score/text_empty": Case(["ensemble", "score", "{T}/ens.yaml", "--text",
                                       "{T}/empty.txt"], "empty.txt"),
    "ensemble_score/text_not_utf8": Case(["ensemble", "score", "{T}/ens.yaml", "--text",
                                          "{T}/latin1.txt"], "latin1.txt"),
    "ensemble_score/context_zero": Case([*ENS_SCORE, "--context", "0"], "--context"),
    "ensemble_score/member_truncated": Case(["ensemble", "score", "{T}/ens_truncated.yaml", "--text",
                                             "{T}/text.txt"], "truncated"),
    "ensemble_score/unknown_method": Case(["ensemble", "score", "{T}/ens_method.yaml", "--text",
                                           "{T}/text.txt"], "ens_method.yaml"),
    "ensemble_check/unknown_method": Case(["ensemble", "check", "{T}/ens_method.yaml"],
                                          "ens_method.yaml"),
    "ensemble_check/key_typo": Case(["ensemble", "check", "{T}/ens_typo.yaml"], "ens_typo.yaml"),
    "ensemble_check/weight_nan": Case(["ensemble", "check", "{T}/ens_nan.yaml"], "weight"),
    "ensemble_check/member_missing": Case(["ensemble", "check", "{T}/ens_missing.yaml"],
                                          "no-such-model"),
    "ensemble_check/member_without_config": Case(["ensemble", "check", "{T}/ens_noconfig.yaml"],
                                                 "noconfig"),
    "ensemble_check/member_config_not_json": Case(["ensemble", "check", "{T}/ens_badconfig.yaml"],
                                                  "badconfig"),
    "ensemble_check/recipe_missing": Case(["ensemble", "check", "missing.yaml"], "missing.yaml"),
    # -- fusekit route build ---------------------------------------------------------------------
    "route_build/data_missing": Case(["route", "build", "{T}/route_missing.yaml", "out"],
                                     "missing.jsonl"),
    "route_build/data_line_without_text": Case(["route", "build", "{T}/route_notext.yaml", "out"],
                                               "notext.jsonl"),
    "route_build/data_fifo": Case(["route", "build", "{T}/route_fifo.yaml", "out"], "fifo"),
    "route_build/out_is_model_folder": Case(["route", "build", "{T}/route.yaml", "{base}"], "{base}"),
    "route_build/out_is_cwd": Case(["route", "build", "{T}/route.yaml", "."], "."),
    "route_build/recipe_is_folder": Case(["route", "build", "{T}/textdir", "out"], "textdir"),
    "route_build/recipe_key_typo": Case(["route", "build", "{T}/route_typo.yaml", "out"],
                                        "route_typo.yaml"),
    "route_build/cost_nan": Case(["route", "build", "{T}/route_nancost.yaml", "out"],
                                 "route_nancost.yaml"),
    # -- fusekit route eval / run / calibrate ----------------------------------------------------
    "route_eval/data_missing": Case(["route", "eval", "{T}/router", "--data", "missing.jsonl"],
                                    "missing.jsonl"),
    "route_eval/data_line_without_text": Case(["route", "eval", "{T}/router", "--data",
                                               "{T}/notext.jsonl", "--no-merge"], "notext.jsonl"),
    "route_eval/data_fifo": Case(["route", "eval", "{T}/router", "--data", "{T}/fifo"], "fifo"),
    "route_eval/costs_edited": Case(["route", "eval", "{T}/router_costs", "--data",
                                     "{T}/data.jsonl", "--no-merge"], "router_costs"),
    "route_eval/weights_truncated": Case(["route", "eval", "{T}/router_truncated", "--data",
                                          "{T}/data.jsonl", "--no-merge"], "router_truncated"),
    "route_eval/not_a_router": Case(["route", "eval", "{base}", "--data", "{T}/data.jsonl"],
                                    "not a fusekit router"),
    "route_eval/share_1_5": Case([*EVAL, "--share", "1.5"], "--share"),
    "route_eval/threshold_nan": Case([*EVAL, "--threshold", "nan"], "--threshold"),
    "route_run/threshold_nan": Case([*RUN, "--threshold", "nan"], "--threshold"),
    "route_run/costs_edited": Case(["route", "run", "{T}/router_costs", "--prompt", "x"],
                                   "router_costs"),
    "route_run/weights_truncated": Case(["route", "run", "{T}/router_truncated", "--prompt", "x"],
                                        "router_truncated"),
    "route_run/router_json_not_json": Case(["route", "run", "{T}/router_badjson", "--prompt", "x"],
                                           "router_badjson"),
    "route_run/not_a_router": Case(["route", "run", "{T}/textdir", "--prompt", "x"],
                                   "not a fusekit router"),
    "route_run/data_fifo": Case(["route", "run", "{T}/router", "--data", "{T}/fifo"], "fifo"),
    "route_run/prompt_and_data": Case([*RUN, "--data", "{T}/data.jsonl"], "--prompt"),
    "route_run/max_new_tokens_zero": Case([*RUN, "--generate", "--max-new-tokens", "0"],
                                          "--max-new-tokens"),
    "route_calibrate/share_1_5": Case([*CALIBRATE[:-4], "--share", "1.5"], "--share"),
    "route_calibrate/share_nan": Case([*CALIBRATE[:-4], "--share", "nan"], "--share"),
    "route_calibrate/data_missing": Case(["route", "calibrate", "{T}/router", "--data",
                                          "missing.jsonl", "--share", "0.5", "--out", "calibrated"],
                                         "missing.jsonl"),
    "route_calibrate/data_line_without_text": Case(["route", "calibrate", "{T}/router", "--data",
                                                    "{T}/notext.jsonl", "--share", "0.5", "--out",
                                                    "calibrated"], "notext.jsonl"),
    "route_calibrate/costs_edited": Case(["route", "calibrate", "{T}/router_costs", "--data",
                                          "{T}/data.jsonl", "--share", "0.5", "--out", "calibrated"],
                                         "router_costs"),
    "route_calibrate/out_is_router": Case([*CALIBRATE[:-1], "{T}/router_truncated"],
                                          "router_truncated"),
    # -- fusekit moe -----------------------------------------------------------------------------
    "moe/out_inside_input_model": Case(["moe", "{T}/moe.yaml", "{base}/moe-out"], "moe-out"),
    "moe/unknown_gate_mode": Case(["moe", "{T}/moe_gate.yaml", "out"], "gate_mode"),
    "moe/expert_missing": Case(["moe", "{T}/moe_missing.yaml", "out"], "no-such-model"),
    "moe/recipe_dev_zero": Case(["moe", "/dev/zero", "out"], "/dev/zero"),
    # -- fusekit push ----------------------------------------------------------------------------
    "push/not_an_output": Case(["push", "{T}/textdir", "org/name"], "textdir"),
    "push/missing_folder": Case(["push", "nowhere", "org/name"], "nowhere"),
    "push/hub_timeout_nan": Case(["push", "{T}/merged", "org/name"], "FUSEKIT_HUB_TIMEOUT",
                                 {"FUSEKIT_HUB_TIMEOUT": "nan"}),
    "push/bad_repo_id": Case(["push", "{T}/merged", "../../etc"], "../../etc"),
    # -- fusekit plan ----------------------------------------------------------------------------
    "plan/recipe_is_folder": Case(["plan", "{T}/textdir"], "textdir"),
    "plan/recipe_dev_zero": Case(["plan", "/dev/zero"], "/dev/zero"),
    "plan/recipe_fifo": Case(["plan", "{T}/fifo"], "fifo"),
    "plan/max_memory_nan": Case(["plan", "{T}/merge.yaml", "--max-memory", "nan"], "--max-memory"),
}

TEXTS = {"code": ["def add(a, b):\n    return a + b\n", "import os\nprint(os.getcwd())\n",
                  "for i in range(10):\n    total += i\n"],
         "math": ["What is 12 times 7? It is 84.\n", "Solve for x: 3x + 5 = 20.\n",
                  "The derivative of x^2 is 2x.\n"],
         "base": ["The river ran quietly past the old mill.\n", "She wrote a letter to her brother.\n",
                  "It rained all afternoon, and the garden smelled of earth.\n"]}


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 60


def _route_recipe(models: dict[str, Path], data: str, extra: str = "") -> str:
    return (f"models:\n  - model: {models['base']}\n    cost: 1\n  - model: {models['math']}\n    cost: 2\n"
            f"  - model: {models['code']}\n    cost: 3\ndata: {data}\nfolds: 3\nlabels: given\n"
            f"features: tfidf\nrouter: {{type: knn, k: 3}}\n{extra}")


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, tokenizer_models: dict[str, Path]) -> Path:
    """Valid inputs for every command, each broken copy next to them, and a built router."""
    import fusekit
    from fusekit.cli import main

    root = tmp_path_factory.mktemp("bad-commands")
    m = tokenizer_models
    (root / "text.txt").write_text("def add(a, b):\n    return a + b\n" * 4, encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    (root / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e\n".encode("latin-1"))
    (root / "textdir").mkdir()
    os.mkfifo(root / "fifo")
    (root / "noprompt.jsonl").write_text('{"prompt": "a"}\n{"question": "b"}\n', encoding="utf-8")
    (root / "notjson.jsonl").write_text('{"prompt": "a"}\n{prompt: b}\n', encoding="utf-8")
    (root / "long.jsonl").write_text(json.dumps({"prompt": "x" * 4096}) + "\n", encoding="utf-8")
    (root / "empty.jsonl").write_text("", encoding="utf-8")

    bad = root / "bad"
    truncated = shutil.copytree(m["base"], bad / "truncated")
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    (shutil.copytree(m["base"], bad / "noconfig") / "config.json").unlink()
    (shutil.copytree(m["base"], bad / "badconfig") / "config.json").write_text("{oops", encoding="utf-8")

    def ensemble(name: str, first: str, second: str, extra: str = "", method: str = "prob_avg") -> None:
        (root / name).write_text(f"models:\n  - model: {first}\n  - model: {second}\n{extra}"
                                 f"method: {method}\n", encoding="utf-8")

    ensemble("ens.yaml", str(m["base"]), str(m["math"]))
    ensemble("ens_truncated.yaml", str(m["base"]), str(bad / "truncated"))
    ensemble("ens_noconfig.yaml", str(m["base"]), str(bad / "noconfig"))
    ensemble("ens_badconfig.yaml", str(m["base"]), str(bad / "badconfig"))
    ensemble("ens_missing.yaml", str(m["base"]), str(root / "no-such-model"))
    ensemble("ens_method.yaml", str(m["base"]), str(m["math"]), method="prob_average")
    ensemble("ens_typo.yaml", str(m["base"]), str(m["math"]), extra="generation: {max_new_token: 4}\n")
    (root / "ens_negative.yaml").write_text(f"models:\n  - model: {m['base']}\n    weight: -1\n"
                                            f"  - model: {m['math']}\n", encoding="utf-8")
    (root / "ens_nan.yaml").write_text(f"models:\n  - model: {m['base']}\n    weight: .nan\n"
                                       f"  - model: {m['math']}\n", encoding="utf-8")

    rows = [{"text": t, "label": label} for label, texts in TEXTS.items() for t in texts]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (root / "notext.jsonl").write_text(json.dumps(rows[0]) + "\n" + json.dumps({"label": "base"}) + "\n",
                                       encoding="utf-8")
    (root / "route.yaml").write_text(_route_recipe(m, str(root / "data.jsonl")), encoding="utf-8")
    (root / "route_missing.yaml").write_text(_route_recipe(m, str(root / "missing.jsonl")), encoding="utf-8")
    (root / "route_notext.yaml").write_text(_route_recipe(m, str(root / "notext.jsonl")), encoding="utf-8")
    (root / "route_fifo.yaml").write_text(_route_recipe(m, str(root / "fifo")), encoding="utf-8")
    (root / "route_typo.yaml").write_text(_route_recipe(m, str(root / "data.jsonl"), "fold: 3\n"),
                                          encoding="utf-8")
    (root / "route_nancost.yaml").write_text(
        _route_recipe(m, str(root / "data.jsonl")).replace("cost: 2", "cost: .nan"), encoding="utf-8")
    with pytest.raises(SystemExit) as info:
        main(["route", "build", str(root / "route.yaml"), str(root / "router"), "--format", "json"])
    assert info.value.code in (0, None)
    costs = shutil.copytree(root / "router", root / "router_costs")
    info_json = json.loads((costs / "router.json").read_text(encoding="utf-8"))
    info_json["models"][0]["cost"] = 99
    (costs / "router.json").write_text(json.dumps(info_json), encoding="utf-8")
    trunc = shutil.copytree(root / "router", root / "router_truncated")
    for file in trunc.glob("*.safetensors"):
        file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    (shutil.copytree(root / "router", root / "router_badjson") / "router.json").write_text(
        "{oops", encoding="utf-8")

    (root / "moe.yaml").write_text(f"base_model: {m['base']}\ngate_mode: cheap_embed\nexperts:\n"
                                   f"  - source_model: {m['math']}\n    positive_prompts: ['2 + 2 = 4']\n"
                                   f"  - source_model: {m['code']}\n    positive_prompts: ['def f():']\n",
                                   encoding="utf-8")
    (root / "moe_gate.yaml").write_text((root / "moe.yaml").read_text().replace("cheap_embed", "smart"),
                                        encoding="utf-8")
    (root / "moe_missing.yaml").write_text(
        (root / "moe.yaml").read_text().replace(str(m["code"]), str(root / "no-such-model")),
        encoding="utf-8")

    (root / "merge.yaml").write_text(f"merge_method: linear\nmodels:\n  - model: {m['base']}\n"
                                     f"    parameters: {{weight: 0.5}}\n  - model: {m['math']}\n"
                                     f"    parameters: {{weight: 0.5}}\n", encoding="utf-8")
    fusekit.merge(root / "merge.yaml", root / "merged")
    return root


def _listing(folder: Path) -> set[tuple[str, int]]:
    return {(str(p.relative_to(folder)), p.lstat().st_size) for p in folder.rglob("*")}


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Any]:
    """Run ``fusekit ...`` in an empty ``tmp_path``, offline; a case that hangs (a FIFO read that
    blocks) fails after 60 s instead of stalling the suite."""
    import huggingface_hub.constants as constants

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def hung(signum: int, frame: Any) -> None:
        raise TimeoutError("the command hung")

    before = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield in_process_cli(capsys)
    signal.alarm(0)
    signal.signal(signal.SIGALRM, before)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_command_is_one_line_and_leaves_nothing(case: str, tree: Path, tokenizer_models: dict[str, Path],
                                                    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    cli: Any) -> None:
    args, culprit, env = CASES[case]
    places = {"T": str(tree), "base": str(tokenizer_models["base"]), "math": str(tokenizer_models["math"])}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    watched = [tree, tokenizer_models["base"]]
    before = [_listing(folder) for folder in watched]
    code, out, err = cli(*(arg.format(**places) for arg in args))
    lines = err.strip().splitlines()
    assert code == 2, f"exit {code}: {err}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fusekit: error: ") and culprit.format(**places) in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [], "the command wrote into its working folder"
    assert [_listing(folder) for folder in watched] == before, "the command changed its inputs"
