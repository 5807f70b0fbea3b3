"""Loading and validating recipes: what parses, and how each mistake is reported.

Every error is one line naming ``file:line:col`` and the key path; line numbers in the asserts are
counted by hand in the YAML strings (line 1 is the first line of the string).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fusekit.errors import FusekitError, RecipeError
from fusekit.recipe import MergeRecipe, load_merge_recipe, parse_merge_recipe
from fusekit.recipe.schema import Filtered


def parse(text: str) -> MergeRecipe:
    return parse_merge_recipe(text, "r.yaml")[0]


def error(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_merge_recipe(text, "r.yaml")
    message = str(info.value)
    lines = message.splitlines()  # one line, or "N problems in r.yaml:" and then one per line
    assert len(lines) == 1 or lines[0] == f"{len(lines) - 1} problems in r.yaml:", message
    return message


# -- valid recipes ------------------------------------------------------------------------------


def test_models_recipe_with_everything() -> None:
    recipe = parse("""\
merge_method: task_arithmetic
base_model: org/base
dtype: bf16
out_dtype: torch.bfloat16
tokenizer_source: base
chat_template: chatml
parameters:
  normalize: true
  lambda: [0.5, 1.0]
models:
  - model: org/base
  - model: org/math
    parameters:
      weight: [0, 1, 0.5]
  - model: {model: {path: org/code, revision: v1.2}}
    parameters:
      weight:
        - filter: self_attn
          value: 0.3
        - filter: "*"
          value: [1, 2]
        - value: 0.7
""")
    assert recipe.merge_method == "task_arithmetic"
    assert recipe.base_model == "org/base"
    assert recipe.dtype == "bfloat16"
    assert recipe.out_dtype == "bfloat16"
    assert recipe.tokenizer_source == "base"
    assert recipe.chat_template == "chatml"
    assert recipe.parameters == {"normalize": True, "lambda": (0.5, 1.0)}
    assert recipe.slices is None
    assert recipe.models is not None
    assert [m.model for m in recipe.models] == ["org/base", "org/math", "org/code@v1.2"]
    assert recipe.models[0].parameters is None
    assert recipe.models[1].parameters == {"weight": (0.0, 1.0, 0.5)}
    assert recipe.models[2].parameters == {"weight": (
        Filtered("self_attn", 0.3), Filtered("*", (1.0, 2.0)), Filtered(None, 0.7))}
    assert recipe.model_refs() == ["org/base", "org/math", "org/code@v1.2"]


def test_slices_recipe() -> None:
    recipe = parse("""\
merge_method: linear
slices:
  - sources:
      - model: a
        layer_range: [0, 4]
        parameters:
          weight: 0.6
      - model: b
        layer_range: [2, 6]
        parameters:
          weight: [0.4, 0.1]
    parameters:
      normalize: false
  - sources:
      - model: c
        layer_range: [4, 5]
""")
    assert recipe.models is None
    assert recipe.slices is not None and len(recipe.slices) == 2
    first, second = recipe.slices
    assert [(s.model, s.layer_range) for s in first.sources] == [("a", (0, 4)), ("b", (2, 6))]
    assert first.sources[0].parameters == {"weight": 0.6}
    assert first.sources[1].parameters == {"weight": (0.4, 0.1)}
    assert first.parameters == {"normalize": False}
    assert second.sources[0].layer_range == (4, 5)
    assert recipe.model_refs() == ["a", "b", "c"]


def test_slice_base_model_satisfies_a_base_method() -> None:
    recipe = parse("""\
merge_method: task_arithmetic
slices:
  - base_model: a
    sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
        parameters: {weight: 1}
""")
    assert recipe.slices is not None and recipe.slices[0].base_model == "a"


@pytest.mark.parametrize(("alias", "name"), [
    ("bf16", "bfloat16"), ("torch.bfloat16", "bfloat16"), ("bfloat16", "bfloat16"),
    ("fp16", "float16"), ("half", "float16"), ("torch.float16", "float16"),
    ("fp32", "float32"), ("float", "float32"), ("torch.float32", "float32"), ("float64", "float64"),
])
def test_dtype_aliases(alias: str, name: str) -> None:
    recipe = parse(f"merge_method: linear\ndtype: {alias}\nmodels:\n  - model: a\n")
    assert recipe.dtype == name


@pytest.mark.parametrize(("ref", "expected"), [
    ("{model: {path: org/x, revision: main}}", "org/x@main"),
    ("{model: {path: org/x}}", "org/x"),
    ("{path: org/x, revision: abc123}", "org/x@abc123"),
    ("{model: org/x}", "org/x"),
    ("org/x@rev", "org/x@rev"),
    ("/abs/path/model", "/abs/path/model"),
])
def test_model_reference_forms(ref: str, expected: str) -> None:
    recipe = parse(f"merge_method: linear\nmodels:\n  - model: {ref}\n")
    assert recipe.models is not None and recipe.models[0].model == expected


def test_tokenizer_block_and_base_model_dict_form() -> None:
    recipe = parse("""\
merge_method: linear
base_model: {model: {path: org/base, revision: r1}}
tokenizer:
  source: org/base
models:
  - model: org/base
""")
    assert recipe.base_model == "org/base@r1"
    assert recipe.tokenizer is not None and recipe.tokenizer.source == "org/base"


def test_load_merge_recipe_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 2}\n",
                    encoding="utf-8")
    recipe, source = load_merge_recipe(path)
    assert recipe.models is not None and recipe.models[0].parameters == {"weight": 2.0}
    assert source.name == str(path)
    assert source.where(("models", 0, "parameters", "weight")) == f"{path}:4:18"


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: linear\nmodel:\n  - model: a\n", encoding="utf-8")
    with pytest.raises(RecipeError, match=r"^" + str(path).replace(".", r"\.") + r":2:1 model:"):
        load_merge_recipe(path)


def test_missing_recipe_file(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="recipe file not found") as info:
        load_merge_recipe(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value)


def test_recipe_errors_are_user_errors() -> None:
    with pytest.raises(FusekitError) as info:
        parse_merge_recipe("merge_method: linear\n", "r.yaml")
    assert info.value.exit_code == 2


# -- errors: keys -------------------------------------------------------------------------------


def test_unknown_top_level_key_suggests_the_right_one() -> None:
    message = error("merge_method: linear\nmodel:\n  - model: a\n")
    assert message == "r.yaml:2:1 model: unknown key 'model'; did you mean 'models'?"


def test_unknown_key_inside_the_second_model() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
    parameters:
      weight: 1
  - model: b
    paramters:
      weight: 1
""")
    assert message == ("r.yaml:7:5 models[1].paramters: unknown key 'paramters'; "
                       "did you mean 'parameters'?")


def test_unknown_key_far_from_any_valid_one_lists_the_valid_keys() -> None:
    message = error("merge_method: linear\nzzz_qqq: 1\nmodels:\n  - model: a\n")
    assert message.startswith("r.yaml:2:1 zzz_qqq: unknown key 'zzz_qqq'; valid keys: ")
    for key in ("base_model", "dtype", "merge_method", "models", "parameters", "slices"):
        assert key in message


def test_unknown_key_inside_a_slice_source() -> None:
    message = error("""\
merge_method: linear
slices:
  - sources:
      - model: a
        layer_rnage: [0, 2]
""")
    assert "r.yaml:5:9 slices[0].sources[0].layer_rnage: unknown key 'layer_rnage'" in message
    assert "did you mean 'layer_range'?" in message


def test_several_problems_are_reported_together() -> None:
    message = error("""\
merge_method: linear
model: x
models:
  - model: a
    paramters: {}
""")
    assert message.splitlines() == ["2 problems in r.yaml:", "  r.yaml:2:1 model: unknown key 'model'; did "
                                    "you mean 'models'?", "  r.yaml:5:5 models[0].paramters: unknown key "
                                    "'paramters'; did you mean 'parameters'?"]


def test_missing_merge_method() -> None:
    message = error("models:\n  - model: a\n")
    assert message.startswith("r.yaml:1:1 ")
    assert "required key 'merge_method' is missing" in message


def test_missing_model_in_a_models_entry() -> None:
    message = error("merge_method: linear\nmodels:\n  - parameters: {weight: 1}\n")
    assert message.startswith("r.yaml:3:5 models[0]: ")
    assert "required key 'model' is missing" in message


def test_both_models_and_slices() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
""")
    assert message.startswith("r.yaml:")
    assert "either 'models' or 'slices'" in message


def test_neither_models_nor_slices() -> None:
    message = error("merge_method: linear\n")
    assert message.startswith("r.yaml:1:1 ")
    assert "either 'models' or 'slices'" in message


def test_empty_models_list() -> None:
    assert "'models' is empty" in error("merge_method: linear\nmodels: []\n")


# -- errors: the document itself ----------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# just a comment\n"])
def test_empty_yaml(text: str) -> None:
    message = error(text)
    assert message.startswith("r.yaml")
    assert "empty" in message


def test_empty_explicit_document() -> None:
    message = error("---\n")
    assert message.startswith("r.yaml")
    assert "empty" in message or "mapping" in message


@pytest.mark.parametrize(("text", "kind"), [("- a\n- b\n", "list"), ("hello\n", "str"),
                                            ("42\n", "int")])
def test_non_mapping_yaml(text: str, kind: str) -> None:
    message = error(text)
    assert message.startswith("r.yaml:1:1 ")
    assert "must be a mapping" in message
    assert message.endswith(f"got {kind}")


def test_malformed_yaml_names_the_line() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
   bad: [
""")
    assert message.startswith("r.yaml:4:")
    assert "malformed YAML" in message


def test_unclosed_bracket_names_the_line() -> None:
    message = error("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: [1, 2\n")
    assert message.startswith("r.yaml:")
    assert "malformed YAML" in message
    line = int(message.split(":")[1])
    assert line in (4, 5)  # the bracket opens on line 4; the parser notices at the end


def test_tab_indentation_names_the_line() -> None:
    message = error("merge_method: linear\nmodels:\n\t- model: a\n")
    assert message.startswith("r.yaml:3:1 malformed YAML")


def test_duplicate_top_level_key() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
merge_method: task_arithmetic
""")
    assert message.startswith("r.yaml:")
    assert "key 'merge_method' appears twice (line 4)" in message


def test_duplicate_key_inside_a_model_entry() -> None:
    message = error("merge_method: linear\nmodels:\n  - model: a\n    model: b\n")
    assert message.startswith("r.yaml:3:")
    assert "key 'model' appears twice (line 4)" in message


def test_too_many_aliases_are_refused() -> None:
    entries = "".join("  - model: a\n    parameters: {weight: *w}\n" for _ in range(150))
    text = "merge_method: linear\nw: &w 1\nmodels:\n" + entries
    message = error(text)
    assert "aliases" in message
    # The 101st alias is refused: line 4 + 2·100 + 1 = 205 (1 header line per entry, then params).
    assert message.startswith("r.yaml:205:")


def test_exponential_sequence_alias_bomb_is_refused() -> None:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):  # 9^9 ≈ 387 million strings if expanded, from 72 aliases
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    message = error("\n".join(lines) + "\n")
    assert message.startswith("r.yaml:")
    assert "alias" in message


def test_exponential_mapping_alias_bomb_is_refused_quickly(tmp_path: Path) -> None:
    # Same bomb built from mappings instead of lists: 9 levels of 9 keys, 72 aliases (under the
    # alias limit). Run in a subprocess so a regression costs 15 s, not the machine's memory.
    lines = ["a: &a {k: lol}"]
    for i in range(1, 9):
        prev, cur = chr(96 + i), chr(97 + i)
        lines.append(f"{cur}: &{cur} {{" + ", ".join(f"k{j}: *{prev}" for j in range(9)) + "}")
    path = tmp_path / "bomb.yaml"
    path.write_text("merge_method: linear\n" + "\n".join(lines) + "\n", encoding="utf-8")
    code = ("import sys\nfrom fusekit.errors import RecipeError\nfrom fusekit.recipe import "
            "load_merge_recipe\ntry:\n    load_merge_recipe(sys.argv[1])\nexcept RecipeError as e:\n"
            "    print(e)\n")
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                              text=True, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("a 72-alias mapping bomb was still being expanded after 15 s")
    assert done.returncode == 0, done.stderr
    assert "alias" in done.stdout or "too large" in done.stdout


@pytest.mark.parametrize("tag", ["!!python/object:os.system ls",
                                 "!!python/object/apply:os.system [ls]",
                                 "!!python/name:os.system ''"])
def test_python_tags_are_refused(tag: str) -> None:
    message = error(f"merge_method: {tag}\nmodels:\n  - model: a\n")
    assert message.startswith("r.yaml:1:")
    assert "python" in message


def test_python_tag_is_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    text = f"!!python/object/apply:os.system ['touch {marker}']\n"
    with pytest.raises(RecipeError):
        parse_merge_recipe(text, "r.yaml")
    assert not marker.exists()


# -- errors: methods and parameters -------------------------------------------------------------


def test_unknown_merge_method_suggests_a_close_one() -> None:
    message = error("merge_method: lineer\nmodels:\n  - model: a\n")
    assert message == "r.yaml:1:1 merge_method: unknown merge method 'lineer'; did you mean 'linear'?"


def test_unknown_merge_method_lists_the_valid_ones() -> None:
    message = error("merge_method: zzzz\nmodels:\n  - model: a\n")
    assert message.startswith("r.yaml:1:1 merge_method: unknown merge method 'zzzz'; valid methods: ")
    for name in ("linear", "passthrough", "task_arithmetic"):
        assert name in message


def test_unknown_parameter_lists_the_methods_parameters() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
    parameters:
      wieght: 1
""")
    assert message.startswith("r.yaml:5:7 models[0].parameters.wieght: ")
    assert "'wieght' is not a parameter of linear" in message
    assert "did you mean 'weight'?" in message
    assert "linear takes: normalize, weight" in message


def test_parameter_of_another_method() -> None:
    text = "merge_method: linear\nparameters:\n  lambda: 0.5\nmodels:\n  - model: a\n"
    assert parse(text).parameters == {"lambda": 0.5}  # no effect: a warning (tests/test_mergekit_compat.py)
    with pytest.raises(RecipeError) as info:
        parse_merge_recipe(text, "r.yaml", strict=True)
    assert str(info.value).startswith("r.yaml:3:3 parameters.lambda: linear does not take 'lambda'")
    assert "normalize, weight" in str(info.value)


def test_non_numeric_parameter() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
    parameters:
      weight: abc
""")
    assert message.startswith("r.yaml:5:7 models[0].parameters.weight: ")
    assert "'abc'" in message


def test_non_numeric_value_inside_a_filter_list() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
    parameters:
      weight:
        - filter: mlp
          value: 0.5
        - filter: self_attn
          value: heavy
""")
    assert message.startswith("r.yaml:9:11 models[0].parameters.weight[1].value: ")
    assert "'heavy'" in message


def test_gradient_with_a_non_number() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
    parameters:
      weight: [0, x]
""")
    assert message.startswith("r.yaml:5:7 models[0].parameters.weight: ")
    assert "[0, 'x']" in message


def test_filter_entry_with_a_misspelt_key() -> None:
    message = error("""\
merge_method: linear
models:
  - model: a
    parameters:
      weight:
        - filters: mlp
          value: 1
""")
    assert message.startswith("r.yaml:5:7 models[0].parameters.weight: ")
    assert "filters" in message


def test_non_finite_parameter() -> None:
    message = error("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: .inf}\n")
    assert "models[0].parameters.weight" in message
    assert "finite" in message


def test_non_boolean_flag() -> None:
    message = error("merge_method: linear\nparameters:\n  normalize: maybe\nmodels:\n  - model: a\n")
    assert message.startswith("r.yaml:3:3 parameters.normalize: ")
    assert "'maybe'" in message


def test_unknown_dtype() -> None:
    message = error("merge_method: linear\ndtype: int8\nmodels:\n  - model: a\n")
    assert message.startswith("r.yaml:2:1 dtype: ")
    assert "'int8'" in message and "bfloat16" in message


# -- errors: models and slices ------------------------------------------------------------------


def test_slice_sources_of_different_lengths() -> None:
    message = error("""\
merge_method: linear
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 3]
""")
    assert message.startswith("r.yaml:3:5 slices[0]: ")
    assert "same number of layers" in message
    assert "a [0, 2]" in message and "b [0, 3]" in message


@pytest.mark.parametrize("layer_range", ["[2, 2]", "[3, 1]", "[-1, 2]"])
def test_bad_layer_range(layer_range: str) -> None:
    message = error(f"""\
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: {layer_range}
""")
    assert message.startswith("r.yaml:5:9 slices[0].sources[0].layer_range: ")
    assert layer_range in message


def test_layer_range_needs_two_numbers() -> None:
    message = error("""\
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 1, 2]
""")
    assert message.startswith("r.yaml:5:9 slices[0].sources[0].layer_range")


def test_task_arithmetic_without_base_model() -> None:
    message = error("""\
merge_method: task_arithmetic
models:
  - model: a
    parameters: {weight: 1}
""")
    assert message.startswith("r.yaml:1:1 merge_method: ")
    assert "task_arithmetic needs a base model" in message
    assert "base_model" in message


def test_task_arithmetic_with_only_the_base() -> None:
    message = error("merge_method: task_arithmetic\nbase_model: a\nmodels:\n  - model: a\n")
    assert message.startswith("r.yaml:3:1 models: ")
    assert "besides the base" in message


def test_passthrough_with_two_models() -> None:
    message = error("merge_method: passthrough\nmodels:\n  - model: a\n  - model: b\n")
    assert message.startswith("r.yaml:2:1 models: ")
    assert "passthrough takes exactly 1" in message
    assert "got 2" in message


def test_passthrough_slice_with_two_sources() -> None:
    message = error("""\
merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 2]
      - model: b
        layer_range: [0, 2]
""")
    assert message.startswith("r.yaml:3:5 slices[0].sources: ")
    assert "got 2" in message


@pytest.mark.parametrize(("ref", "why"), [('""', "empty"), ("{model: a, lora: {revision: x}}", "path"),
                                          ("42", "string"), ("{model: {revision: x}}", "path")])
def test_bad_model_reference(ref: str, why: str) -> None:
    message = error(f"merge_method: linear\nmodels:\n  - model: {ref}\n")
    assert message.startswith("r.yaml:3:")
    assert "models[0].model" in message
    assert why in message


def test_tokenizer_source_and_tokenizer_together() -> None:
    message = error("""\
merge_method: linear
tokenizer_source: base
tokenizer: {source: base}
models:
  - model: a
""")
    assert "either 'tokenizer_source' or 'tokenizer'" in message


# -- numbers that cannot be numbers ---------------------------------------------------------------


@pytest.mark.parametrize("value", ["1" + "0" * 400, "-" + "9" * 400, "1e400", "-1.5e+400", ".nan", ".inf",
                                   "[0.5, " + "1" + "0" * 400 + "]",
                                   "[{filter: mlp, value: 1e400}, {value: 1}]"])
def test_numbers_beyond_a_float_name_the_key_and_the_range(value: str) -> None:
    message = error(f"merge_method: linear\nmodels:\n  - model: a\n    parameters: {{weight: {value}}}\n")
    assert "models[0].parameters.weight" in message
    assert "must be a finite number between -1.8e+308 and 1.8e+308" in message
    assert len(message) < 300


def test_a_400_digit_integer_is_described_not_printed() -> None:
    message = error("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: "
                    + "7" * 400 + "}\n")
    assert "an integer of 400 digits" in message and "7777" not in message


def test_an_integer_python_cannot_convert_names_the_line() -> None:
    message = error("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: "
                    + "9" * 5000 + "}\n")
    assert message.startswith("r.yaml:4:26 ") and "5000 digits" in message


def test_the_largest_finite_numbers_are_still_accepted() -> None:
    recipe = parse("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1.7e308}\n"
                   "  - model: b\n    parameters: {weight: " + "9" * 300 + "}\n")
    assert recipe.models is not None and recipe.models[0].parameters == {"weight": 1.7e308}
    assert recipe.models[1].parameters == {"weight": float("9" * 300)}


def test_a_layer_range_beyond_any_model_is_refused_with_the_bound() -> None:
    message = error("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n"
                    "        layer_range: [0, " + "1" + "0" * 400 + "]\n")
    assert "slices[0].sources[0].layer_range" in message and "<= 100000" in message
    assert len(message) < 300
    assert parse("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n"
                 "        layer_range: [0, 100000]\n").slices is not None


def test_a_huge_value_is_quoted_short() -> None:
    message = error("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: ["
                    + ", ".join(["[1]"] * 3000) + "]}\n")
    assert "models[0].parameters.weight" in message and "characters)" in message
    assert len(message) < 400


# -- mergekit keys refused, not ignored -------------------------------------------------------------


def test_tokenizer_surgery_keys_are_accepted() -> None:
    recipe = parse("merge_method: linear\nmodels:\n  - model: a\ntokenizer:\n  pad_to_multiple_of: 64\n"
                   "  tokens:\n    <pad>: {source: a}\n    <x>: {source: {kind: zero}, force: true}\n")
    assert recipe.tokenizer is not None and recipe.tokenizer.source == "union"  # mergekit's default
    assert recipe.tokenizer.pad_to_multiple_of == 64 and recipe.tokenizer.token_models() == ["a"]


@pytest.mark.parametrize(("block", "expected"), [
    ("tokenizer: {pad_to_multiple_of: 0}\n", "tokenizer.pad_to_multiple_of"),
    ("tokenizer:\n  tokens:\n    <pad>: {source: b}\n", "model 'b', which the recipe does not merge"),
    ("tokenizer:\n  tokens:\n    <pad>: {source: {kind: model_token, model: a}}\n", "exactly one of 'token'"),
])
def test_bad_tokenizer_surgery_values(block: str, expected: str) -> None:
    assert expected in error("merge_method: linear\nmodels:\n  - model: a\n" + block)


def test_tokenizer_block_with_only_a_source_is_accepted() -> None:
    recipe = parse("merge_method: linear\nmodels:\n  - model: a\ntokenizer: {source: a, tokens: null}\n")
    assert recipe.tokenizer is not None and recipe.tokenizer.source == "a"


def test_slice_residual_weight_is_refused() -> None:
    message = error("merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n"
                    "        layer_range: [0, 2]\n    residual_weight: 0.5\n")
    assert message.startswith("r.yaml:6:5 slices[0].residual_weight: ")
    assert "not supported by fusekit yet" in message


# -- bounded reads ----------------------------------------------------------------------------------


def test_a_recipe_over_the_size_limit_is_refused_before_parsing(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("merge_method: linear\nmodels: [{model: a}]\nchat_template: '{" + "x" * 4999 + "'\n",
                    encoding="utf-8")
    monkeypatch.setenv("FUSEKIT_MAX_RECIPE_BYTES", "4096")
    with pytest.raises(RecipeError, match="larger than the 4096 bytes limit.*FUSEKIT_MAX_RECIPE_BYTES"):
        load_merge_recipe(path)
    monkeypatch.setenv("FUSEKIT_MAX_RECIPE_BYTES", "8192")
    assert load_merge_recipe(path)[0].chat_template == "{" + "x" * 4999


@pytest.mark.parametrize(("make", "expected"), [
    (lambda p: p.mkdir(), "is a folder"),
    (lambda p: __import__("os").mkfifo(p), "FIFO"),
    (lambda p: p.symlink_to("/dev/zero"), "character device"),
])
def test_a_recipe_that_is_not_a_regular_file_is_refused(tmp_path: Path, make: Any, expected: str) -> None:
    path = tmp_path / "r.yaml"
    make(path)
    with pytest.raises(RecipeError, match=expected) as info:
        load_merge_recipe(path)
    assert str(path) in str(info.value)


def test_a_recipe_path_through_a_file_is_not_found(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x", encoding="utf-8")
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_merge_recipe(tmp_path / "file" / "r.yaml")
