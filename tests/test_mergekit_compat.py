"""What mergekit users type: settings mergekit ignores (warnings, --strict errors), its built-in chat
templates, its ``mergekit-yaml`` flags, ``fusekit schema``/``validate``, shell completion, and the
small forms real recipes use (``revision`` beside ``model``, a model listed twice, the legacy
``tokenizer_source: model:<path>``)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
from conftest import in_process_cli, load_weights, write_recipe

import fusekit.merging
from fusekit.chat_templates import load_template, template_names
from fusekit.errors import RecipeError
from fusekit.recipe import parse_merge_recipe

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Any:
    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    return in_process_cli(capsys)


def warnings_of(text: str, caplog: pytest.LogCaptureFixture, **options: Any) -> list[str]:
    with caplog.at_level(logging.WARNING, logger="fusekit"):
        caplog.clear()
        parse_merge_recipe(text, "r.yaml", **options)
    return [r.getMessage() for r in caplog.records]


# -- settings mergekit ignores --------------------------------------------------------------------

SCE = """\
merge_method: sce
base_model: org/base
parameters:
  select_topk: 0.5
  normalize: true
models:
  - model: org/a
    parameters: {weight: 0.5, density: 0.3}
  - model: org/b
"""


def test_parameters_the_method_does_not_take_are_warnings_naming_their_line(
        caplog: pytest.LogCaptureFixture) -> None:
    found = warnings_of(SCE, caplog)
    assert found == [
        "warning: r.yaml:5:3 parameters.normalize: sce does not take 'normalize', so it has no effect "
        "(mergekit ignores it too); remove it (sce takes: int8_mask, select_topk)",
        "warning: r.yaml:8:18 models[0].parameters.weight: sce does not take 'weight', so it has no "
        "effect (mergekit ignores it too); remove it (sce takes: int8_mask, select_topk)",
        "warning: r.yaml:8:31 models[0].parameters.density: sce does not take 'density', so it has no "
        "effect (mergekit ignores it too); remove it (sce takes: int8_mask, select_topk)",
    ]


@pytest.mark.parametrize(("text", "where"), [
    (SCE, "r.yaml:5:3 parameters.normalize: sce does not take 'normalize'"),
    ("merge_method: model_stock\nbase_model: b\nmodels:\n  - {model: a, parameters: {weight: 1}}\n"
     "  - {model: c}\n", "r.yaml:4:29 models[0].parameters.weight: model_stock does not take 'weight'"),
    ("merge_method: linear\nparameters: {dtype: bfloat16}\nmodels: [{model: a}]\n",
     "r.yaml:2:14 parameters.dtype: 'dtype' has no effect inside parameters"),
    ("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: {lambda: 1, density: 1}}]\n",
     "r.yaml:3:34 models[0].parameters.lambda: 'lambda' applies to the whole merge"),
])
def test_strict_makes_each_ignored_setting_an_error(text: str, where: str,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    assert any(where.split(" ", 1)[1] in line for line in warnings_of(text, caplog))
    with pytest.raises(RecipeError) as info:
        parse_merge_recipe(text, "r.yaml", strict=True)
    assert where in str(info.value) and "--strict refuses settings that have no effect" in str(info.value)


def test_a_name_no_method_takes_stays_an_error_with_a_suggestion() -> None:
    with pytest.raises(RecipeError, match=r"r.yaml:3:34 models\[0\].parameters.desnity: 'desnity' is not a "
                                          r"parameter of ties; did you mean 'density'\?"):
        parse_merge_recipe("merge_method: ties\nbase_model: b\nmodels: [{model: a, parameters: "
                           "{desnity: 0.5}}]\n", "r.yaml")


def test_an_ignored_parameter_changes_no_byte_of_the_output(cli: Any, tmp_path: Path,
                                                            tiny_models: dict[str, Path]) -> None:
    models = (f"models:\n  - {{model: {tiny_models['math']}, parameters: {{weight: 1}}}}\n"
              f"  - {{model: {tiny_models['code']}, parameters: {{weight: 2}}}}\n")
    write_recipe(tmp_path / "plain.yaml", "merge_method: linear\n" + models)
    write_recipe(tmp_path / "noisy.yaml", "merge_method: linear\nparameters: {density: 0.1, dtype: "
                 "float16, select_topk: 0.2}\n" + models)
    assert cli("merge", str(tmp_path / "plain.yaml"), str(tmp_path / "plain"))[0] == 0
    code, _, err = cli("merge", str(tmp_path / "noisy.yaml"), str(tmp_path / "noisy"))
    assert code == 0, err
    assert sum("has no effect" in line for line in err.splitlines()) == 3, err
    plain, noisy = load_weights(tmp_path / "plain"), load_weights(tmp_path / "noisy")
    assert plain.keys() == noisy.keys() and all(torch.equal(plain[k], noisy[k]) for k in plain)
    code, _, err = cli("merge", str(tmp_path / "noisy.yaml"), str(tmp_path / "strict"), "--strict")
    assert code == 2 and "noisy.yaml:2:14 parameters.density: linear does not take 'density'" in err
    assert not (tmp_path / "strict").exists()


def test_a_model_listed_twice_is_merged_once_as_mergekit_does(cli: Any, tmp_path: Path,
                                                              tiny_models: dict[str, Path]) -> None:
    math, code_model = tiny_models["math"], tiny_models["code"]
    write_recipe(tmp_path / "r.yaml", f"""\
merge_method: linear
models:
  - model: {math}
    parameters: {{weight: 1.0}}
  - model: {code_model}
    parameters: {{weight: 3.0}}
  - model: {math}
    parameters: {{weight: 5.0}}
""")
    code, _, err = cli("merge", str(tmp_path / "r.yaml"), str(tmp_path / "out"))
    assert code == 0, err
    assert f"r.yaml:7:5 models[2]: '{math}' is listed again (first as models[0])" in err
    out, a, b = (load_weights(p) for p in (tmp_path / "out", math, code_model))
    for name, tensor in out.items():  # the first entry's weight: (1·a + 3·b) / 4
        expected = (a[name].double() + 3 * b[name].double()) / 4
        torch.testing.assert_close(tensor.double(), expected, rtol=1e-6, atol=1e-6)


def test_a_later_duplicate_supplies_only_the_parameters_the_first_lacks() -> None:
    recipe = parse_merge_recipe("merge_method: ties\nbase_model: b\nmodels:\n"
                                "  - {model: a, parameters: {weight: 1}}\n"
                                "  - {model: a, parameters: {weight: 2, density: 0.5}}\n")[0]
    assert recipe.models is not None and len(recipe.models) == 1
    assert recipe.models[0].parameters == {"weight": 1.0, "density": 0.5}


# -- small forms real recipes use ---------------------------------------------------------------


def test_revision_beside_model_means_model_at_revision() -> None:
    recipe = parse_merge_recipe("""\
merge_method: passthrough
slices:
  - sources: [{model: org/a, revision: v2, layer_range: [0, 2]}]
  - sources: [{model: {path: org/b, revision: main}, revision: main, layer_range: [2, 4]}]
""")[0]
    assert recipe.slices is not None
    assert [s.sources[0].model for s in recipe.slices] == ["org/a@v2", "org/b@main"]
    models = parse_merge_recipe("merge_method: linear\nmodels: [{model: org/a, revision: abc123}]\n")[0]
    assert models.model_refs() == ["org/a@abc123"]


def test_legacy_tokenizer_source_model_prefix_names_the_model() -> None:
    recipe = parse_merge_recipe("merge_method: linear\nmodels: [{model: a}]\n"
                                "tokenizer_source: model:org/tok\n")[0]
    assert recipe.tokenizer_source == "org/tok"


# -- chat templates -----------------------------------------------------------------------------

TURNS = [{"role": "user", "content": "U1"}, {"role": "assistant", "content": "A1"},
         {"role": "user", "content": "U2"}]
SHAPES = {  # what a 2-turn conversation renders to, in order; the last entry ends the text
    "alpaca": ["### Instruction:\nU1", "\n\n### Response:\nA1", "\n\n### Instruction:\nU2",
               "\n\n### Response:\n"],
    "chatml": ["<|im_start|>user\nU1<|im_end|>\n", "<|im_start|>assistant\nA1<|im_end|>\n",
               "<|im_start|>user\nU2<|im_end|>\n", "<|im_start|>assistant\n"],
    "exaone": ["[|system|][|endofturn|]\n", "[|user|]U1\n", "[|assistant|]A1[|endofturn|]\n",
               "[|user|]U2\n", "[|assistant|]"],
    "llama3": ["<s>", "<|start_header_id|>user<|end_header_id|>\n\nU1<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\nA1<|eot_id|>",
               "<|start_header_id|>user<|end_header_id|>\n\nU2<|eot_id|>",
               "<|start_header_id|>assistant<|end_header_id|>\n\n"],
    "mistral": ["<s>", " [INST] U1 [/INST]", " A1</s>", " [INST] U2 [/INST]"],
    "zephyr": ["<|user|>\nU1</s>\n", "<|assistant|>\nA1</s>\n", "<|user|>\nU2</s>\n", "<|assistant|>\n"],
}


def test_every_mergekit_template_name_is_built_in() -> None:
    assert set(template_names()) == set(SHAPES)
    assert {"alpaca", "chatml", "exaone", "llama3", "mistral"} <= set(template_names())  # mergekit 0.1.5


def test_the_templates_are_package_data() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    patterns = config["tool"]["setuptools"]["package-data"]["fusekit"]
    for path in (ROOT / "fusekit" / "chat_templates").glob("*.jinja"):
        assert any(fnmatch(path.relative_to(ROOT / "fusekit").as_posix(), p) for p in patterns), path


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory, tokenizer_models: dict[str, Path]) -> Path:
    """One merge per template name, its output's tokenizer written by fusekit."""
    from fusekit.merging import merge

    root = tmp_path_factory.mktemp("templated")
    for name in SHAPES:
        base = tokenizer_models["base"]
        recipe = write_recipe(root / f"{name}.yaml", f"merge_method: linear\nchat_template: {name}\n"
                              f"models:\n  - {{model: {base}, parameters: {{weight: 1}}}}\n")
        merge(recipe, root / name)
    return root


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_each_template_renders_two_turns_in_order(name: str, templated: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(templated / name)
    assert tokenizer.chat_template == load_template(name)
    text = tokenizer.apply_chat_template(TURNS, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str)
    position = 0
    for part in SHAPES[name]:
        found = text.find(part, position)
        assert found == position, f"{name}: {part!r} not next in {text!r}"
        position = found + len(part)
    assert position == len(text), f"{name}: unexpected text after the last turn: {text[position:]!r}"


def test_an_unknown_template_name_lists_the_names(cli: Any, tmp_path: Path) -> None:
    write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels: [{model: a}]\nchat_template: vicuna\n")
    code, _, err = cli("validate", str(tmp_path / "r.yaml"))
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "r.yaml:3:1 chat_template: 'vicuna' is neither" in err
    assert "auto, alpaca, chatml, exaone, llama3, mistral, zephyr" in err


# -- mergekit-yaml's flags ------------------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Replace fusekit.merging.merge with a recorder of its keyword arguments."""
    calls: dict[str, Any] = {}

    def fake(recipe: Any, out_dir: Any, **options: Any) -> Any:
        calls.update(options)
        raise RecipeError("recorded")

    monkeypatch.setattr(fusekit.merging, "merge", fake)
    return calls


def test_cuda_and_allow_crimes_reach_the_merge(cli: Any, recorded: dict[str, Any]) -> None:
    assert cli("merge", "r.yaml", "out", "--cuda", "--allow-crimes", "--strict")[0] == 2
    assert recorded["device"] == "cuda" and recorded["allow_crimes"] is True and recorded["strict"] is True
    recorded.clear()
    cli("merge", "r.yaml", "out")
    assert recorded["device"] == "cpu" and recorded["allow_crimes"] is False and recorded["strict"] is False


NEEDLESS = ["--lazy-unpickle", "--trust-remote-code", "--lora-merge-cache", "--write-model-card",
            "--low-cpu-memory", "--clone-tensors"]


def test_each_needless_flag_says_once_that_it_has_no_effect(cli: Any, recorded: dict[str, Any]) -> None:
    args = [*NEEDLESS[:2], NEEDLESS[2], "/tmp/cache", *NEEDLESS[3:]]
    _, _, err = cli("merge", "r.yaml", "out", *args)
    lines = [line for line in err.splitlines() if "has no effect" in line]
    assert [line.split(" ")[1] for line in lines] == NEEDLESS, err
    _, _, err = cli("merge", "r.yaml", "out", "--no-write-model-card")
    assert "--write-model-card has no effect" in err
    _, _, err = cli("merge", "r.yaml", "out", "--copy-tokenizer", "--out-shard-size", "1B")
    assert "has no effect" not in err and recorded["out_shard_size"] == 10**9


def test_mergekit_flags_sit_in_their_own_help_panel(cli: Any) -> None:
    code, out, _ = cli("merge", "--help")
    assert code == 0
    panel = out[out.index("mergekit compatibility"):]
    for flag in ["--cuda", "--allow-crimes", *NEEDLESS]:
        assert flag in panel and flag not in out[:out.index("mergekit compatibility")]


# -- schema, validate, completion ------------------------------------------------------------------


def test_schema_prints_each_recipe_kinds_json_schema(cli: Any, tmp_path: Path) -> None:
    from fusekit.recipe.schema import MergeRecipe

    code, out, _ = cli("schema", "merge")
    schema = json.loads(out)
    assert code == 0 and schema["title"] == "fusekit merge recipe"
    assert set(schema["properties"]) == set(MergeRecipe.model_fields)
    assert schema["required"] == ["merge_method"] and schema["additionalProperties"] is False
    for kind, key in [("moe", "experts"), ("ensemble", "method"), ("route", "router")]:
        code, out, _ = cli("schema", kind, "--out", str(tmp_path / f"{kind}.json"))
        assert code == 0 and out == ""
        assert key in json.loads((tmp_path / f"{kind}.json").read_text(encoding="utf-8"))["properties"]
    assert cli("schema", "lora")[0] == 2


def test_schema_imports_no_model_library() -> None:
    code = ("import sys\nfrom fusekit.cli import main\nfor kind in ('merge', 'moe', 'ensemble', 'route'):\n"
            "    try:\n        main(['schema', kind])\n"
            "    except SystemExit as e:\n        assert e.code == 0\n"
            "heavy = {'torch', 'transformers', 'peft', 'accelerate'} & set(sys.modules)\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_validate_checks_a_recipe_without_its_models(cli: Any, tmp_path: Path) -> None:
    write_recipe(tmp_path / "r.yaml", SCE)
    code, out, err = cli("validate", str(tmp_path / "r.yaml"))
    assert code == 0 and "a valid merge recipe (sce, 3 models)" in out
    assert err.count("has no effect") == 3
    code, _, err = cli("validate", str(tmp_path / "r.yaml"), "--strict")
    assert code == 2 and err.count("--strict refuses settings that have no effect") == 3


def test_shell_completion_is_on() -> None:
    env = {**os.environ, "SHELL": "/bin/bash"}
    run = [sys.executable, "-m", "fusekit"]
    shown = subprocess.run([*run, "--show-completion"], capture_output=True, text=True, env=env,
                           timeout=300, cwd=ROOT)
    assert shown.returncode == 0 and "_FUSEKIT_COMPLETE=complete_bash" in shown.stdout, shown.stderr
    env.update({"_FUSEKIT_COMPLETE": "complete_bash", "COMP_WORDS": "fusekit merge --allow-c",
                "COMP_CWORD": "2"})
    words = subprocess.run(run, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert words.stdout.split() == ["--allow-crimes"], words.stderr
