"""End-to-end merges through ``fusekit.merge``, checked tensor by tensor against float64 references.

References are written here from mergekit's definitions (never by calling fusekit's kernels):
gradients are interpolated over the layers at ``t = layer / (n_layers - 1)`` (embeddings, final norm
and LM head use ``t = 0``), filters are substrings of the tensor name tried in order.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY, load_weights, write_recipe

import fusekit
from fusekit.demo import build_demo_models
from fusekit.errors import FusekitError, OutputExistsError

F32 = {"rtol": 1e-5, "atol": 1e-6}
LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# -- reference helpers -------------------------------------------------------------------------------


def as64(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: tensor.double() for name, tensor in weights.items()}


def depth(name: str, n_layers: int) -> float:
    """mergekit's t: relative layer depth, 0 for tensors outside the blocks."""
    match = LAYER.match(name)
    if match is None or n_layers == 1:
        return 0.0
    return int(match.group(1)) / (n_layers - 1)


def gradient(points: list[float], t: float) -> float:
    """Piecewise-linear interpolation of evenly spaced points at t in [0, 1]."""
    return float(np.interp(t, np.linspace(0.0, 1.0, len(points)), points))


WeightRule = Callable[[str, float], float]


def ref_linear(models: list[dict[str, torch.Tensor]], rules: list[WeightRule], n_layers: int, *,
               normalize: bool = True) -> dict[str, torch.Tensor]:
    out = {}
    for name in models[0]:
        t = depth(name, n_layers)
        weights = [rule(name, t) for rule in rules]
        total = sum(w * m[name] for w, m in zip(weights, models, strict=True))
        out[name] = total / math.fsum(weights) if normalize else total
    return out


def ref_task_arithmetic(base: dict[str, torch.Tensor], models: list[dict[str, torch.Tensor]],
                        rules: list[WeightRule], n_layers: int, *, lambda_: float = 1.0,
                        normalize: bool = False) -> dict[str, torch.Tensor]:
    out = {}
    for name in base:
        t = depth(name, n_layers)
        weights = [rule(name, t) for rule in rules]
        mixed = sum(w * (m[name] - base[name]) for w, m in zip(weights, models, strict=True))
        if normalize:
            divisor = math.fsum(weights)
            mixed = mixed / (divisor if abs(divisor) >= 1e-8 else 1.0)
        out[name] = base[name] + lambda_ * mixed
    return out


def const(value: float) -> WeightRule:
    return lambda name, t: value


def assert_state_close(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *,
                       dtype: torch.dtype = torch.float32, **tolerance: float) -> None:
    assert sorted(actual) == sorted(expected)
    tolerance = tolerance or F32
    for name, tensor in expected.items():
        assert actual[name].dtype == dtype, name
        assert actual[name].shape == tensor.shape, name
        torch.testing.assert_close(actual[name].double(), tensor, msg=lambda m, n=name: f"{n}: {m}",
                                   **tolerance)


def assert_within_ulp(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor],
                      dtype: torch.dtype, ulps: float = 1.0) -> None:
    """Each value within ``ulps`` units in the last place of ``dtype`` from the float64 reference."""
    assert sorted(actual) == sorted(expected)
    finfo = torch.finfo(dtype)
    for name, ref in expected.items():
        assert actual[name].dtype == dtype, name
        error = (actual[name].double() - ref).abs()
        # relative ulps for normal numbers, the subnormal spacing near zero
        bound = ulps * (finfo.eps * ref.abs() + finfo.smallest_normal * finfo.eps)
        assert torch.all(error <= bound), f"{name}: max error {float(error.max()):.3e}"


def model_yaml(path: Path, parameters: str | None = None) -> str:
    text = f"  - model: {path}\n"
    if parameters:
        text += f"    parameters: {parameters}\n"
    return text


# -- linear and task arithmetic ------------------------------------------------------------------------


def test_linear_merge_matches_reference(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["base"], "{weight: 0.2}")
                          + model_yaml(tiny_models["math"], "{weight: 0.5}")
                          + model_yaml(tiny_models["code"], "{weight: 0.3}"))
    result = fusekit.merge(recipe, tmp_path / "out")
    models = [as64(load_weights(tiny_models[n])) for n in ("base", "math", "code")]
    expected = ref_linear(models, [const(0.2), const(0.5), const(0.3)], 2)
    assert_state_close(load_weights(tmp_path / "out"), expected)
    assert result.out_dir == tmp_path / "out"
    assert result.stats.tensors == len(expected)
    assert sorted((tmp_path / "out").glob("*.safetensors")) == [tmp_path / "out" / "model.safetensors"]


def test_merge_result_lists_the_written_files(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: passthrough\nmodels:\n"
                          + model_yaml(tiny_models["base"]))
    result = fusekit.merge(recipe, tmp_path / "out", out_shard_size=30_000)
    written = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(written) > 1
    # the result should name the files in the output folder, not the temporary folder they were
    # written in before it was renamed into place
    assert sorted(result.stats.files) == written


@pytest.mark.parametrize(("weights", "normalize"), [((1.0, 1.0), False), ((3.0, 1.0), True),
                                                    ((0.75, 1.25), False)])
def test_linear_normalize_flag(tiny_models: dict[str, Path], tmp_path: Path, weights: tuple[float, float],
                               normalize: bool) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["math"], f"{{weight: {weights[0]}}}")
                          + model_yaml(tiny_models["code"], f"{{weight: {weights[1]}}}")
                          + f"parameters:\n  normalize: {str(normalize).lower()}\n")
    fusekit.merge(recipe, tmp_path / "out")
    models = [as64(load_weights(tiny_models[n])) for n in ("math", "code")]
    expected = ref_linear(models, [const(w) for w in weights], 2, normalize=normalize)
    assert_state_close(load_weights(tmp_path / "out"), expected)


def test_linear_gradient_and_filter_parameters(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["base"], "{weight: [1.0, 3.0]}")
                          + model_yaml(tiny_models["math"],
                                       "\n      weight:\n        - {filter: self_attn, value: 0.5}\n"
                                       "        - {value: 2.0}")
                          + model_yaml(tiny_models["code"], "{weight: [0.25, 0.75]}"))
    fusekit.merge(recipe, tmp_path / "out")
    models = [as64(load_weights(tiny_models[n])) for n in ("base", "math", "code")]
    rules = [
        lambda name, t: gradient([1.0, 3.0], t),
        lambda name, t: 0.5 if "self_attn" in name else 2.0,
        lambda name, t: gradient([0.25, 0.75], t),
    ]
    expected = ref_linear(models, rules, 2)
    assert_state_close(load_weights(tmp_path / "out"), expected)
    # spot checks that the rules above mean what the brief says (t = 0 for the embeddings and head)
    base, math_, code = models
    emb = "model.embed_tokens.weight"
    torch.testing.assert_close(expected[emb], (1.0 * base[emb] + 2.0 * math_[emb] + 0.25 * code[emb]) / 3.25)
    q1 = "model.layers.1.self_attn.q_proj.weight"
    torch.testing.assert_close(expected[q1], (3.0 * base[q1] + 0.5 * math_[q1] + 0.75 * code[q1]) / 4.25)


def test_gradient_interpolates_between_points_over_four_layers(tmp_path: Path) -> None:
    models4 = build_demo_models(tmp_path / "deep", **{**TINY, "num_layers": 4})
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(models4["base"], "{weight: 1.0}")
                          + model_yaml(models4["math"], "{weight: [0.0, 1.0, 4.0]}")
                          + "parameters:\n  normalize: false\n")
    fusekit.merge(recipe, tmp_path / "out")
    models = [as64(load_weights(models4[n])) for n in ("base", "math")]
    rules = [const(1.0), lambda name, t: gradient([0.0, 1.0, 4.0], t)]
    # t = 0, 1/3, 2/3, 1 → math weight 0, 2/3, 2, 4
    assert [gradient([0.0, 1.0, 4.0], i / 3) for i in range(4)] == pytest.approx([0.0, 2 / 3, 2.0, 4.0])
    expected = ref_linear(models, rules, 4, normalize=False)
    assert_state_close(load_weights(tmp_path / "out"), expected)


def test_top_level_parameters_fill_in_for_models(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["base"])
                          + model_yaml(tiny_models["math"], "{weight: 3.0}")
                          + "parameters:\n  weight: 0.5\n")
    fusekit.merge(recipe, tmp_path / "out")
    models = [as64(load_weights(tiny_models[n])) for n in ("base", "math")]
    assert_state_close(load_weights(tmp_path / "out"), ref_linear(models, [const(0.5), const(3.0)], 2))


@pytest.mark.parametrize(("normalize", "base_listed"), [(False, False), (True, True)])
def test_task_arithmetic_matches_reference(tiny_models: dict[str, Path], tmp_path: Path, normalize: bool,
                                           base_listed: bool) -> None:
    listed_base = model_yaml(tiny_models["base"], "{weight: 5.0}") if base_listed else ""
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: "
                          f"{tiny_models['base']}\nmodels:\n" + listed_base
                          + model_yaml(tiny_models["math"], "{weight: 0.7}")
                          + model_yaml(tiny_models["code"], "{weight: [0.2, 0.6]}")
                          + f"parameters:\n  lambda: 0.8\n  normalize: {str(normalize).lower()}\n")
    fusekit.merge(recipe, tmp_path / "out")
    base = as64(load_weights(tiny_models["base"]))
    models = [as64(load_weights(tiny_models[n])) for n in ("math", "code")]
    rules = [const(0.7), lambda name, t: gradient([0.2, 0.6], t)]
    # the base model is not a task vector, whatever weight it is given
    expected = ref_task_arithmetic(base, models, rules, 2, lambda_=0.8, normalize=normalize)
    assert_state_close(load_weights(tmp_path / "out"), expected)


def test_task_arithmetic_defaults_lambda_one_no_normalize(tiny_models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: "
                          f"{tiny_models['base']}\nmodels:\n"
                          + model_yaml(tiny_models["math"], "{weight: 0.9}")
                          + model_yaml(tiny_models["code"], "{weight: 0.6}"))
    fusekit.merge(recipe, tmp_path / "out")
    base = as64(load_weights(tiny_models["base"]))
    models = [as64(load_weights(tiny_models[n])) for n in ("math", "code")]
    expected = ref_task_arithmetic(base, models, [const(0.9), const(0.6)], 2)
    assert_state_close(load_weights(tmp_path / "out"), expected)


@pytest.mark.parametrize("weights", [(1.0, 1.0), (0.3, 0.7), (5.0, 1e-3), (3.0, -1.0)])
def test_merging_a_model_with_itself_returns_it(tiny_models: dict[str, Path], tmp_path: Path,
                                                weights: tuple[float, float]) -> None:
    folder = tiny_models["math"]
    # the same checkpoint named twice: as its folder and as its weights file
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(folder, f"{{weight: {weights[0]}}}")
                          + model_yaml(folder / "model.safetensors", f"{{weight: {weights[1]}}}"))
    fusekit.merge(recipe, tmp_path / "out")
    original = load_weights(folder)
    merged = load_weights(tmp_path / "out")
    assert sorted(merged) == sorted(original)
    for name, tensor in original.items():
        torch.testing.assert_close(merged[name], tensor, rtol=1e-6, atol=0)


# -- shards, dtypes, tied embeddings -----------------------------------------------------------------


def test_sharded_inputs_and_outputs_round_trip(sharded_models: dict[str, Path], tmp_path: Path) -> None:
    assert (sharded_models["base"] / "model.safetensors.index.json").is_file()
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(sharded_models["base"], "{weight: 0.4}")
                          + model_yaml(sharded_models["code"], "{weight: 0.6}"))
    shard_limit = 25_000
    result = fusekit.merge(recipe, tmp_path / "out", out_shard_size=shard_limit)
    out = tmp_path / "out"
    models = [as64(load_weights(sharded_models[n])) for n in ("base", "code")]
    expected = ref_linear(models, [const(0.4), const(0.6)], 2)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    count = len(files)
    assert count > 1
    assert [f.name for f in files] == [f"model-{i:05d}-of-{count:05d}.safetensors"
                                       for i in range(1, count + 1)]
    assert not (out / "model.safetensors").exists()
    assert sorted(index["weight_map"]) == sorted(expected)
    assert set(index["weight_map"].values()) == {f.name for f in files}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expected.values())
    from safetensors import safe_open

    for file in files:
        with safe_open(file, "pt") as handle:
            shapes = {n: handle.get_slice(n).get_shape() for n in handle.keys()}  # noqa: SIM118
        assert set(shapes) == {n for n, f in index["weight_map"].items() if f == file.name}
        size = sum(math.prod(shape) * 4 for shape in shapes.values())
        assert size <= shard_limit or len(shapes) == 1
    assert result.stats.tensors == len(expected)
    assert_state_close(load_weights(out), expected)


def test_bf16_inputs_compute_and_write_bf16_by_default(bf16_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(bf16_models["base"], "{weight: 0.3}")
                          + model_yaml(bf16_models["math"], "{weight: 0.7}"))
    fusekit.merge(recipe, tmp_path / "out")
    models = [as64(load_weights(bf16_models[n])) for n in ("base", "math")]
    expected = ref_linear(models, [const(0.3), const(0.7)], 2)
    # float32 accumulation, one rounding to bfloat16
    assert_within_ulp(load_weights(tmp_path / "out"), expected, torch.bfloat16)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "bfloat16"


def test_bf16_task_arithmetic_without_dtype_stays_bf16(bf16_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: "
                          f"{bf16_models['base']}\nmodels:\n"
                          + model_yaml(bf16_models["math"], "{weight: 0.5}")
                          + model_yaml(bf16_models["code"], "{weight: 0.5}"))
    fusekit.merge(recipe, tmp_path / "out")
    base = as64(load_weights(bf16_models["base"]))
    models = [as64(load_weights(bf16_models[n])) for n in ("math", "code")]
    expected = ref_task_arithmetic(base, models, [const(0.5), const(0.5)], 2)
    merged = load_weights(tmp_path / "out")
    # computed in bfloat16: a few roundings of size eps·(|base| + |θ|)
    for name, ref in expected.items():
        assert merged[name].dtype == torch.bfloat16
        scale = base[name].abs() + models[0][name].abs() + models[1][name].abs()
        error = (merged[name].double() - ref).abs()
        assert torch.all(error <= 4 * 2**-8 * scale), name
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"


def test_dtype_float32_on_bf16_inputs(bf16_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: task_arithmetic\nbase_model: "
                          f"{bf16_models['base']}\nmodels:\n"
                          + model_yaml(bf16_models["math"], "{weight: 0.5}")
                          + model_yaml(bf16_models["code"], "{weight: 0.3}")
                          + "parameters: {lambda: 0.9}\ndtype: float32\n")
    fusekit.merge(recipe, tmp_path / "out")
    base = as64(load_weights(bf16_models["base"]))
    models = [as64(load_weights(bf16_models[n])) for n in ("math", "code")]
    expected = ref_task_arithmetic(base, models, [const(0.5), const(0.3)], 2, lambda_=0.9)
    assert_state_close(load_weights(tmp_path / "out"), expected, dtype=torch.float32)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == "float32"
    assert "torch_dtype" not in config


def test_out_dtype_is_written_and_recorded(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["base"], "{weight: 0.5}")
                          + model_yaml(tiny_models["math"], "{weight: 0.5}")
                          + "dtype: float32\nout_dtype: bfloat16\n")
    fusekit.merge(recipe, tmp_path / "out")
    models = [as64(load_weights(tiny_models[n])) for n in ("base", "math")]
    expected = ref_linear(models, [const(0.5), const(0.5)], 2)
    assert_within_ulp(load_weights(tmp_path / "out"), expected, torch.bfloat16)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    # and a lone ``dtype`` sets both the compute and the written dtype
    recipe = write_recipe(tmp_path / "r2.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["base"], "{weight: 0.5}")
                          + model_yaml(tiny_models["math"], "{weight: 0.5}") + "dtype: float16\n")
    fusekit.merge(recipe, tmp_path / "out16")
    # the inputs are cast to the compute dtype first, then accumulated in float32 and rounded once
    halves = [{k: v.half().double() for k, v in m.items()} for m in models]
    assert_within_ulp(load_weights(tmp_path / "out16"), ref_linear(halves, [const(0.5), const(0.5)], 2),
                      torch.float16)
    assert json.loads((tmp_path / "out16" / "config.json").read_text())["dtype"] == "float16"


def test_float32_config_dtype_untouched_without_dtype(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["base"], "{weight: 1}")
                          + model_yaml(tiny_models["math"], "{weight: 1}"))
    fusekit.merge(recipe, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    donor = json.loads((tiny_models["base"] / "config.json").read_text())
    assert config == donor


def test_tied_embeddings_output_has_no_lm_head(tied_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tied_models["math"], "{weight: 0.6}")
                          + model_yaml(tied_models["code"], "{weight: 0.4}"))
    fusekit.merge(recipe, tmp_path / "out")
    merged = load_weights(tmp_path / "out")
    assert "lm_head.weight" not in merged
    models = [as64(load_weights(tied_models[n])) for n in ("math", "code")]
    assert "lm_head.weight" not in models[0]
    assert_state_close(merged, ref_linear(models, [const(0.6), const(0.4)], 2))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


# -- slices ------------------------------------------------------------------------------------------


def test_passthrough_frankenmerge_stacks_and_renumbers_layers(tiny_models: dict[str, Path],
                                                              tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: passthrough
slices:
  - sources:
      - model: {tiny_models['base']}
        layer_range: [0, 2]
  - sources:
      - model: {tiny_models['math']}
        layer_range: [1, 2]
""")
    fusekit.merge(recipe, tmp_path / "out")
    merged = load_weights(tmp_path / "out")
    base, math_ = load_weights(tiny_models["base"]), load_weights(tiny_models["math"])
    expected = {"model.embed_tokens.weight": base["model.embed_tokens.weight"],
                "model.norm.weight": math_["model.norm.weight"], "lm_head.weight": math_["lm_head.weight"]}
    for out_layer, (source, layer) in enumerate([(base, 0), (base, 1), (math_, 1)]):
        for name, tensor in source.items():
            match = LAYER.match(name)
            if match and int(match.group(1)) == layer:
                expected[f"model.layers.{out_layer}.{match.group(2)}"] = tensor
    assert sorted(merged) == sorted(expected)
    assert len(merged) == 1 + 3 * 9 + 2
    for name, tensor in expected.items():
        assert torch.equal(merged[name], tensor), name
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    donor = json.loads((tiny_models["base"] / "config.json").read_text())
    assert config["num_hidden_layers"] == 3
    assert {k: v for k, v in config.items() if k != "num_hidden_layers"} == {
        k: v for k, v in donor.items() if k != "num_hidden_layers"}


def test_passthrough_scale_with_filter(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: passthrough
slices:
  - sources:
      - model: {tiny_models['code']}
        layer_range: [1, 2]
        parameters:
          scale:
            - filter: mlp
              value: 0.5
""")
    fusekit.merge(recipe, tmp_path / "out")
    merged = load_weights(tmp_path / "out")
    code = load_weights(tiny_models["code"])
    assert sorted(n for n in merged if n.startswith("model.layers.")) == sorted(
        n.replace("layers.1.", "layers.0.") for n in code if n.startswith("model.layers.1."))
    for name, tensor in merged.items():
        source = code[name.replace("layers.0.", "layers.1.")].double()
        expected = source * 0.5 if ".mlp." in name else source
        torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=0, msg=name)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 1


def test_slices_with_two_sources_merge_linearly_per_layer(tiny_models: dict[str, Path],
                                                          tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", f"""merge_method: linear
slices:
  - sources:
      - model: {tiny_models['base']}
        layer_range: [0, 1]
        parameters: {{weight: 0.3}}
      - model: {tiny_models['math']}
        layer_range: [1, 2]
        parameters: {{weight: 0.7}}
  - sources:
      - model: {tiny_models['code']}
        layer_range: [0, 2]
        parameters: {{weight: 1.0}}
      - model: {tiny_models['math']}
        layer_range: [0, 2]
        parameters: {{weight: [1.0, 3.0]}}
""")
    fusekit.merge(recipe, tmp_path / "out")
    merged = load_weights(tmp_path / "out")
    base, math_, code = (as64(load_weights(tiny_models[n])) for n in ("base", "math", "code"))

    def layer(model: dict[str, torch.Tensor], index: int) -> dict[str, torch.Tensor]:
        found = {}
        for name, tensor in model.items():
            match = LAYER.match(name)
            if match and int(match.group(1)) == index:
                found[match.group(2)] = tensor
        return found

    expected: dict[str, torch.Tensor] = {}
    emb = "model.embed_tokens.weight"
    expected[emb] = (0.3 * base[emb] + 0.7 * math_[emb]) / 1.0  # first slice's sources
    for rest, tensor in layer(base, 0).items():
        expected[f"model.layers.0.{rest}"] = (0.3 * tensor + 0.7 * layer(math_, 1)[rest]) / 1.0
    for i, math_weight in enumerate((1.0, 3.0)):  # t = 0 and 1 inside the second slice
        for rest, tensor in layer(code, i).items():
            expected[f"model.layers.{1 + i}.{rest}"] = (
                (tensor + math_weight * layer(math_, i)[rest]) / (1.0 + math_weight))
    for name in ("model.norm.weight", "lm_head.weight"):  # last slice's sources at t = 0
        expected[name] = (code[name] + 1.0 * math_[name]) / 2.0
    assert_state_close(merged, expected)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 3


# -- loading the output with transformers ------------------------------------------------------------


def test_output_loads_in_transformers_with_reference_logits(tokenizer_models: dict[str, Path],
                                                             tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    recipe_text = ("merge_method: linear\nmodels:\n"
                   + model_yaml(tokenizer_models["base"], "{weight: [1.0, 2.0]}")
                   + model_yaml(tokenizer_models["math"], "{weight: 0.5}")
                   + model_yaml(tokenizer_models["code"], "{weight: 1.5}"))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text)
    fusekit.merge(recipe, tmp_path / "out")
    out = tmp_path / "out"

    tokenizer = AutoTokenizer.from_pretrained(out)
    source_tokenizer = AutoTokenizer.from_pretrained(tokenizer_models["base"])
    text = "Merged models, 2 + 2 = 4!"
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.tolist() == source_tokenizer(text, return_tensors="pt").input_ids.tolist()
    assert ids.shape[1] == len(text.encode()) + 1  # byte-level with <s> prepended

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert type(model).__name__ == "LlamaForCausalLM"
    model.eval()

    models = [as64(load_weights(tokenizer_models[n])) for n in ("base", "math", "code")]
    rules = [lambda name, t: gradient([1.0, 2.0], t), const(0.5), const(1.5)]
    reference_state = {k: v.float() for k, v in ref_linear(models, rules, 2).items()}
    reference = LlamaForCausalLM(LlamaConfig.from_pretrained(tokenizer_models["base"])).float().eval()
    reference.load_state_dict(reference_state, strict=True)

    with torch.no_grad():
        logits = model(ids).logits
        expected = reference(ids).logits
    assert logits.shape == (1, ids.shape[1], 260)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)


# -- files beside the weights ------------------------------------------------------------------------


def test_model_card_and_recipe_copy(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    recipe_text = ("# a recipe with a comment\nmerge_method: linear\nmodels:\n"
                   + model_yaml(tiny_models["base"], "{weight: 1}")
                   + model_yaml(tiny_models["math"], "{weight: 1}  # trailing comment"))
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text)
    fusekit.merge(recipe, tmp_path / "my-merge")
    out = tmp_path / "my-merge"
    assert (out / "mergekit_config.yml").read_text(encoding="utf-8") == recipe_text
    card = (out / "README.md").read_text(encoding="utf-8")
    match = re.match(r"\A---\n(.*?)\n---\n", card, re.DOTALL)
    assert match, card[:200]
    front = yaml.safe_load(match.group(1))
    assert front["library_name"] == "transformers"
    assert {"merge", "fusekit"} <= set(front["tags"])
    assert front["merge_method"] == "linear"
    assert "base_model" not in front  # local paths are not Hub ids; fusekit.inputs names them
    assert front["fusekit"]["inputs"] == [Path(os.path.relpath(m, tmp_path)).as_posix()
                                          for m in (tiny_models["base"], tiny_models["math"])]
    assert "# my-merge" in card
    shown = recipe_text  # models named by absolute path appear relative to the recipe's folder
    for model in (tiny_models["base"], tiny_models["math"]):
        shown = shown.replace(str(model), Path(os.path.relpath(model, tmp_path)).as_posix())
    assert shown.strip() in card and str(tiny_models["base"]) not in card
    assert (out / "generation_config.json").read_text() == (
        tiny_models["base"] / "generation_config.json").read_text()


# -- failures leave nothing behind -------------------------------------------------------------------


def test_failing_merge_leaves_no_output_and_no_partial_folder(tiny_models: dict[str, Path],
                                                              tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    recipe = write_recipe(work / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["base"], "{weight: 1.0}")
                          + model_yaml(tiny_models["math"], "{weight: -1.0}"))
    with pytest.raises(FusekitError, match="sum to 0") as caught:
        fusekit.merge(recipe, work / "out")
    assert "tensor '" in str(caught.value)  # the error names the tensor
    assert not (work / "out").exists()
    assert sorted(p.name for p in work.iterdir()) == ["r.yaml"]


def test_failing_merge_with_overwrite_keeps_previous_output(tiny_models: dict[str, Path],
                                                            tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "out").mkdir(parents=True)
    (work / "out" / "keep.txt").write_text("previous")
    (work / "out" / "fusekit.lock").write_text("{}")  # --overwrite replaces only fusekit outputs
    recipe = write_recipe(work / "r.yaml", "merge_method: linear\nmodels:\n"
                          + model_yaml(tiny_models["base"], "{weight: 2.0}")
                          + model_yaml(tiny_models["math"], "{weight: -2.0}"))
    with pytest.raises(OutputExistsError):
        fusekit.merge(recipe, work / "out")
    with pytest.raises(FusekitError, match="sum to 0"):
        fusekit.merge(recipe, work / "out", overwrite=True)
    assert sorted(p.name for p in (work / "out").iterdir()) == ["fusekit.lock", "keep.txt"]
    assert sorted(p.name for p in work.iterdir()) == ["out", "r.yaml"]


def test_overwrite_replaces_previous_output(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.safetensors").write_bytes(b"junk")
    (out / "fusekit.lock").write_text("{}")  # a previous fusekit output: --overwrite may replace it
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: passthrough\nmodels:\n"
                          + model_yaml(tiny_models["code"]))
    fusekit.merge(recipe, out, overwrite=True)
    assert not (out / "stale.safetensors").exists()
    merged, code = load_weights(out), load_weights(tiny_models["code"])
    assert sorted(merged) == sorted(code)
    assert all(torch.equal(merged[n], code[n]) for n in code)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "r.yaml"]
    shutil.rmtree(out)
