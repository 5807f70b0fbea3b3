"""The ``fusekit`` command line, run for real in a subprocess.

Every bad input must end with exit status 2, a single line on stderr naming the culprit, and no
output at all: neither OUT_DIR nor a hidden ``.<name>.fusekit-partial-*`` folder beside it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import annotated_types
import pytest
import torch
import yaml
from conftest import load_weights, write_recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import fusekit
from fusekit.demo import build_demo_models
from fusekit.ops import get_method, method_names

RunCli = Callable[..., subprocess.CompletedProcess[str]]

Q_PROJ = "model.layers.0.self_attn.q_proj.weight"
UP_PROJ_1 = "model.layers.1.mlp.up_proj.weight"


# -- helpers ------------------------------------------------------------------------------------


def linear_recipe(*models: Path | str, weights: tuple[float | str, ...] | None = None) -> str:
    weights = weights or tuple(1.0 for _ in models)
    entries = "".join(f"  - model: {m}\n    parameters:\n      weight: {w}\n"
                      for m, w in zip(models, weights, strict=True))
    return f"merge_method: linear\nmodels:\n{entries}"


def partial_folders(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if ".fusekit-partial-" in p.name)


def assert_refused(result: subprocess.CompletedProcess[str], out_dir: Path, *culprits: str) -> str:
    """Exit 2, one stderr line naming every culprit, nothing written; return that line."""
    stderr = result.stderr.strip()
    assert result.returncode == 2, f"exit {result.returncode}; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert len(stderr.splitlines()) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert stderr.startswith("fusekit: error: "), stderr
    for culprit in culprits:
        assert culprit in stderr, f"{culprit!r} not named in: {stderr}"
    assert not out_dir.exists(), f"{out_dir} was created"
    assert partial_folders(out_dir.parent) == []
    return stderr


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def rewrite_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = folder / "model.safetensors"
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def run_merge(run_cli: RunCli, tmp_path: Path, recipe_text: str, *extra: str,
              env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], Path]:
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_text)
    out_dir = tmp_path / "out"
    return run_cli("merge", recipe, out_dir, *extra, cwd=tmp_path, env=env), out_dir


# -- bad inputs ---------------------------------------------------------------------------------


def test_malformed_yaml(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    text = linear_recipe(tiny_models["base"], tiny_models["math"]) + "   broken: [\n"
    result, out_dir = run_merge(run_cli, tmp_path, text)
    # Line 9 is the broken one (2 header lines + 3 lines per model).
    line = assert_refused(result, out_dir, "recipe.yaml:9:", "malformed YAML")
    assert str(tmp_path / "recipe.yaml") in line


def test_unknown_key_with_suggestion(run_cli: RunCli, tmp_path: Path,
                                     tiny_models: dict[str, Path]) -> None:
    text = linear_recipe(tiny_models["base"], tiny_models["math"]).replace("models:", "model:")
    result, out_dir = run_merge(run_cli, tmp_path, text)
    assert_refused(result, out_dir, "recipe.yaml:2:1", "unknown key 'model'", "did you mean 'models'?")


def test_unknown_merge_method(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    text = linear_recipe(tiny_models["base"], tiny_models["math"]).replace("linear", "lenear")
    result, out_dir = run_merge(run_cli, tmp_path, text)
    assert_refused(result, out_dir, "recipe.yaml:1:1", "unknown merge method 'lenear'",
                   "did you mean 'linear'?")


def test_missing_model_folder(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    missing = tmp_path / "no-such-model"
    result, out_dir = run_merge(run_cli, tmp_path, linear_recipe(tiny_models["base"], missing))
    assert_refused(result, out_dir, f"model '{missing}'", "no such folder")


def test_hub_model_not_cached_while_offline(run_cli: RunCli, tmp_path: Path,
                                            tiny_models: dict[str, Path]) -> None:
    hf_home = tmp_path / "hf-home"
    hf_home.mkdir()
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(hf_home), "HF_HUB_CACHE": str(hf_home / "hub"),
           "HUGGINGFACE_HUB_CACHE": str(hf_home / "hub")}
    text = linear_recipe(tiny_models["base"], "nobody-org/no-such-model")
    result, out_dir = run_merge(run_cli, tmp_path, text, env=env)
    assert_refused(result, out_dir, "'nobody-org/no-such-model'", "offline")


@pytest.mark.parametrize("broken_first", [False, True], ids=["broken-second", "broken-first"])
def test_tensor_missing_from_one_model(run_cli: RunCli, tmp_path: Path,
                                       tiny_models: dict[str, Path], broken_first: bool) -> None:
    broken = copy_model(tiny_models["math"], tmp_path / "math-missing")
    rewrite_weights(broken, lambda tensors: tensors.pop(UP_PROJ_1))
    models = (broken, tiny_models["base"]) if broken_first else (tiny_models["base"], broken)
    result, out_dir = run_merge(run_cli, tmp_path, linear_recipe(*models))
    assert_refused(result, out_dir, UP_PROJ_1, str(broken))


def test_shape_mismatch(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    broken = copy_model(tiny_models["math"], tmp_path / "math-reshaped")
    rewrite_weights(broken, lambda tensors: tensors.__setitem__(Q_PROJ, torch.zeros(32, 16)))
    result, out_dir = run_merge(run_cli, tmp_path, linear_recipe(tiny_models["base"], broken))
    assert_refused(result, out_dir, Q_PROJ, "[32, 32]", "[32, 16]", str(broken))


def test_non_numeric_parameter(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    text = linear_recipe(tiny_models["base"], tiny_models["math"], weights=(1.0, "lots"))
    result, out_dir = run_merge(run_cli, tmp_path, text)
    # models[1].parameters.weight is on line 8 (2 header lines + 3 per model), column 7.
    assert_refused(result, out_dir, "recipe.yaml:8:7", "models[1].parameters.weight", "'lots'")


def _bounded_parameter() -> tuple[str, str, str, float] | None:
    """(method, 'model' or 'method', YAML name, an out-of-range value) for the first bounded one."""
    for name in method_names():
        method = get_method(name)
        for scope, params in (("model", method.model_params), ("method", method.method_params)):
            for field_name, field in params.model_fields.items():
                for bound in field.metadata:
                    if isinstance(bound, annotated_types.Ge | annotated_types.Gt):
                        low = bound.ge if isinstance(bound, annotated_types.Ge) else bound.gt
                        return name, scope, field.alias or field_name, float(low) - 1.0
                    if isinstance(bound, annotated_types.Le | annotated_types.Lt):
                        high = bound.le if isinstance(bound, annotated_types.Le) else bound.lt
                        return name, scope, field.alias or field_name, float(high) + 1.0
    return None


def test_out_of_range_parameter(run_cli: RunCli, tmp_path: Path,
                                tiny_models: dict[str, Path]) -> None:
    # linear, task_arithmetic and passthrough take unbounded numbers (weight, lambda, scale), so
    # this only runs once a method with a bounded parameter (e.g. a density in [0, 1]) exists.
    found = _bounded_parameter()
    if found is None:
        pytest.skip("no registered merge method has a parameter with a range")
    method_name, _, param, value = found
    method = get_method(method_name)
    base, math_, code = tiny_models["base"], tiny_models["math"], tiny_models["code"]
    others = [math_, code][: max(1, method.min_models)]
    if method.max_models is not None:
        others = others[: method.max_models]
    lines = [f"merge_method: {method_name}", "parameters:", f"  {param}: {value}"]
    models = others
    if method.base == "required":
        lines.append(f"base_model: {base}")
        models = [base, *others]
    lines += ["models:", *[f"  - model: {m}" for m in models]]
    result, out_dir = run_merge(run_cli, tmp_path, "\n".join(lines) + "\n")
    assert_refused(result, out_dir, "recipe.yaml:3:3", f"parameters.{param}", str(value))


def test_slices_with_different_lengths(run_cli: RunCli, tmp_path: Path,
                                       tiny_models: dict[str, Path]) -> None:
    text = f"""\
merge_method: linear
slices:
  - sources:
      - model: {tiny_models["base"]}
        layer_range: [0, 2]
      - model: {tiny_models["math"]}
        layer_range: [0, 1]
"""
    result, out_dir = run_merge(run_cli, tmp_path, text)
    assert_refused(result, out_dir, "recipe.yaml:3:5", "slices[0]", "same number of layers",
                   f"{tiny_models['base']} [0, 2]", f"{tiny_models['math']} [0, 1]")


def test_layer_range_past_the_last_layer(run_cli: RunCli, tmp_path: Path,
                                         tiny_models: dict[str, Path]) -> None:
    text = f"""\
merge_method: passthrough
slices:
  - sources:
      - model: {tiny_models["base"]}
        layer_range: [1, 3]
"""
    result, out_dir = run_merge(run_cli, tmp_path, text)
    assert_refused(result, out_dir, "slices[0]", "[1, 3]", str(tiny_models["base"]), "2 layers")


def test_output_folder_exists_and_overwrite_replaces_it(run_cli: RunCli, tmp_path: Path,
                                                       tiny_models: dict[str, Path]) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep-me.txt").write_text("precious", encoding="utf-8")
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(tiny_models["base"],
                                                                  tiny_models["math"]))
    result = run_cli("merge", recipe, out_dir, cwd=tmp_path)
    stderr = result.stderr.strip()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(stderr.splitlines()) == 1
    assert str(out_dir) in stderr
    assert "--overwrite" in stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep-me.txt"]
    assert (out_dir / "keep-me.txt").read_text(encoding="utf-8") == "precious"
    assert partial_folders(tmp_path) == []

    result = run_cli("merge", recipe, out_dir, "--overwrite", cwd=tmp_path)  # not a fusekit output
    assert result.returncode == 2 and "keep-me.txt" in result.stderr, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == ["keep-me.txt"]
    (out_dir / "fusekit.lock").write_text("{}", encoding="utf-8")  # a previous fusekit output
    result = run_cli("merge", recipe, out_dir, "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    names = {p.name for p in out_dir.iterdir()}
    assert "keep-me.txt" not in names
    assert {"config.json", "model.safetensors", "README.md", "mergekit_config.yml"} <= names
    assert partial_folders(tmp_path) == []


def _damage(folder: Path, how: str) -> None:
    file = folder / "model.safetensors"
    data = bytearray(file.read_bytes())
    if how == "truncated":
        data = data[: len(data) // 2]
    elif how == "huge-header-length":
        data[:8] = (2**62).to_bytes(8, "little")
    elif how == "garbage-json":
        length = int.from_bytes(data[:8], "little")
        data[8:8 + length] = b"\x00not json at all" + b"#" * (length - 16)
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(("how", "why"), [("truncated", "truncated"),
                                          ("huge-header-length", "header"),
                                          ("garbage-json", "not a JSON object")])
def test_damaged_safetensors(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path],
                             how: str, why: str) -> None:
    broken = copy_model(tiny_models["math"], tmp_path / "math-damaged")
    _damage(broken, how)
    result, out_dir = run_merge(run_cli, tmp_path, linear_recipe(tiny_models["base"], broken))
    assert_refused(result, out_dir, str(broken / "model.safetensors"), why)


def test_error_during_the_merge_leaves_nothing(run_cli: RunCli, tmp_path: Path,
                                               tiny_models: dict[str, Path]) -> None:
    # Weights summing to zero can only be refused once tensors are being written.
    text = linear_recipe(tiny_models["base"], tiny_models["math"], weights=(1.0, -1.0))
    result, out_dir = run_merge(run_cli, tmp_path, text)
    assert_refused(result, out_dir, "sum to 0", "model.embed_tokens.weight")


@pytest.mark.parametrize("args", [
    ("merge", "{recipe}", "{out}", "--out-shard-size", "abc"),
    ("plan", "{recipe}", "--format", "xml"),
], ids=["shard-size-abc", "format-xml"])
def test_usage_errors_exit_2(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path],
                             args: tuple[str, ...]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(tiny_models["base"],
                                                                  tiny_models["math"]))
    out_dir = tmp_path / "out"
    argv = [a.format(recipe=recipe, out=out_dir) for a in args]
    result = run_cli(*argv, cwd=tmp_path)
    assert result.returncode == 2, f"exit {result.returncode}; stderr:\n{result.stderr}"
    assert "Traceback" not in result.stderr
    assert result.stderr.strip()
    if "abc" in args:
        assert "'abc' is not a size" in result.stderr
    assert not out_dir.exists()
    assert partial_folders(tmp_path) == []


@pytest.mark.parametrize(("args", "culprits"), [
    (("plan", "{recipe}", "--format", "xml"), ("--format", "'xml'", "fusekit plan --help")),
    (("merge", "{recipe}", "{out}", "--device", "tpu"), ("--device", "'tpu'", "fusekit merge --help")),
    (("merge", "{recipe}", "{out}", "--random-seed", "x"), ("--random-seed", "'x'")),
    (("plan", "{recipe}", "--bogus"), ("--bogus",)),
], ids=["format-xml", "device-tpu", "seed-x", "unknown-option"])
def test_usage_errors_are_one_line(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path],
                                   args: tuple[str, ...], culprits: tuple[str, ...]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(tiny_models["base"],
                                                                  tiny_models["math"]))
    out_dir = tmp_path / "out"
    result = run_cli(*[a.format(recipe=recipe, out=out_dir) for a in args], cwd=tmp_path)
    assert_refused(result, out_dir, *culprits)
    assert result.stdout == ""


def test_plan_json_spellings_agree(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(tiny_models["base"],
                                                                  tiny_models["math"]))
    as_json = run_cli("plan", recipe, "--json", cwd=tmp_path)
    format_json = run_cli("plan", recipe, "--format", "json", cwd=tmp_path)
    assert as_json.returncode == format_json.returncode == 0, as_json.stderr + format_json.stderr
    first, second = json.loads(as_json.stdout), json.loads(format_json.stdout)
    for summary in (first, second):  # the estimate includes each process's own resident memory
        assert summary.pop("peak_memory_bytes") > summary.pop("baseline_bytes") > 0
    assert first == second and first["merge_method"] == "linear"


# -- happy paths --------------------------------------------------------------------------------


def test_version(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fusekit {fusekit.__version__}"


def test_merge_help(run_cli: RunCli, tmp_path: Path) -> None:
    result = run_cli("merge", "--help", cwd=tmp_path, env={"COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "--out-shard-size" in result.stdout
    assert "--overwrite" in result.stdout


def _tensor_names(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as handle:
        return set(handle.keys())


def test_plan_text(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(tiny_models["base"],
                                                                  tiny_models["math"]))
    result = run_cli("plan", recipe, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "merge method: linear" in out
    assert str(tiny_models["base"]) in out and str(tiny_models["math"]) in out
    assert "peak memory estimate" in out
    assert f"writes {len(_tensor_names(tiny_models['base']))} tensors" in out
    assert "tensors:" not in out  # no per-tensor listing without --verbose
    assert not any(tmp_path.glob("**/*.safetensors"))


def test_plan_json(run_cli: RunCli, tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(tiny_models["base"],
                                                                  tiny_models["math"]))
    result = run_cli("plan", recipe, "--format", "json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    names = _tensor_names(tiny_models["base"])
    with safe_open(tiny_models["base"] / "model.safetensors", "pt") as handle:
        expected_bytes = sum(math.prod(handle.get_slice(n).get_shape()) * 4 for n in names)
    assert summary["tensors"] == len(names)
    assert summary["bytes_written"] == expected_bytes  # float32 in, float32 out
    assert isinstance(summary["peak_memory_bytes"], int) and summary["peak_memory_bytes"] > 0
    assert summary["merge_method"] == "linear"
    assert set(summary["models"]) == {str(tiny_models["base"]), str(tiny_models["math"])}


def test_plan_verbose_lists_every_tensor_once(run_cli: RunCli, tmp_path: Path,
                                              tiny_models: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(tiny_models["base"],
                                                                  tiny_models["math"]))
    result = run_cli("plan", recipe, "--verbose", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    listing = lines[lines.index("tensors:") + 1:]
    names = _tensor_names(tiny_models["base"])
    assert len(listing) == len(names)
    assert sorted(line.split()[0] for line in listing) == sorted(names)


def test_merge_writes_a_complete_model(run_cli: RunCli, tmp_path: Path,
                                       tiny_models: dict[str, Path]) -> None:
    base, math_ = tiny_models["base"], tiny_models["math"]
    text = linear_recipe(base, math_, weights=(1.0, 3.0))
    recipe = write_recipe(tmp_path / "recipe.yaml", text)
    out_dir = tmp_path / "merged"
    result = run_cli("merge", recipe, out_dir, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "merged 21 tensors" in result.stdout
    assert {"config.json", "model.safetensors", "README.md", "mergekit_config.yml"} <= {
        p.name for p in out_dir.iterdir()}
    assert partial_folders(tmp_path) == []

    config = json.loads((out_dir / "config.json").read_text(encoding="utf-8"))
    source_config = json.loads((base / "config.json").read_text(encoding="utf-8"))
    assert config["num_hidden_layers"] == source_config["num_hidden_layers"] == 2
    assert config["hidden_size"] == 32

    readme = (out_dir / "README.md").read_text(encoding="utf-8")
    assert readme.startswith("---\n")
    front = yaml.safe_load(readme.split("---\n")[1])
    assert front["library_name"] == "transformers"
    assert {"merge", "fusekit"} <= set(front["tags"])
    assert front["merge_method"] == "linear"

    assert (out_dir / "mergekit_config.yml").read_text(encoding="utf-8") == text

    merged = load_weights(out_dir)
    assert set(merged) == _tensor_names(base)
    a, b = load_file(base / "model.safetensors"), load_file(math_ / "model.safetensors")
    for name in (Q_PROJ, "lm_head.weight"):
        expected = (a[name].double() + 3 * b[name].double()) / 4
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7)


def test_merge_with_small_shards_writes_an_index(run_cli: RunCli, tmp_path: Path,
                                                 tiny_models: dict[str, Path]) -> None:
    recipe = write_recipe(tmp_path / "recipe.yaml", linear_recipe(tiny_models["base"],
                                                                  tiny_models["math"]))
    out_dir = tmp_path / "merged"
    result = run_cli("merge", recipe, out_dir, "--out-shard-size", "20KB", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    shards = sorted(out_dir.glob("*.safetensors"))
    assert len(shards) > 1
    assert not (out_dir / "model.safetensors").exists()
    assert all(s.name.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    index = json.loads((out_dir / "model.safetensors.index.json").read_text(encoding="utf-8"))
    weight_map = index["weight_map"]
    assert set(weight_map) == _tensor_names(tiny_models["base"])
    assert set(weight_map.values()) == {s.name for s in shards}
    for shard in shards:
        assert shard.stat().st_size <= 20_000 or len(load_file(shard)) == 1
        for name in load_file(shard):
            assert weight_map[name] == shard.name


# -- interruption -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def big_recipe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three models of ~120 MB each, so a merge runs for a second or more."""
    folder = tmp_path_factory.mktemp("big")
    models = build_demo_models(folder / "models", hidden_size=512, num_layers=8, vocab_size=8192,
                               with_tokenizer=False)
    return write_recipe(folder / "recipe.yaml", linear_recipe(*models.values()))


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)],
                         ids=["SIGTERM", "SIGINT"])
def test_interrupted_merge_leaves_nothing(tmp_path: Path, big_recipe: Path, sig: int,
                                          code: int) -> None:
    out_dir = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "FUSEKIT_DEBUG"}
    # A shell without job control starts background jobs with SIGINT ignored, and Python then
    # keeps ignoring it; give the child the default disposition, as a terminal would.
    proc = subprocess.Popen([sys.executable, "-m", "fusekit", "merge", str(big_recipe), str(out_dir)],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 60
        while not partial_folders(tmp_path):
            assert proc.poll() is None, f"merge ended before writing began: {proc.communicate()}"
            assert time.monotonic() < deadline, "no partial output folder appeared within 60 s"
            time.sleep(0.01)
        # The merge must still be running (it takes over a second here), or nothing is tested.
        assert proc.poll() is None, "the merge finished before it could be interrupted; make " \
                                    "the models bigger"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, f"exit {proc.returncode}; stderr:\n{stderr}"
    assert not out_dir.exists()
    assert partial_folders(tmp_path) == []
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1:] == ["fusekit: interrupted; no output was left behind"]


def test_the_merge_path_never_imports_transformers(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A merge (and the CLI's import) runs without transformers: it is an extra, not a dependency."""
    recipe = write_recipe(tmp_path / "r.yaml", linear_recipe(*tiny_models.values()))
    code = ("import sys; from fusekit.cli import main\n"
            "try:\n    main(['merge', sys.argv[1], sys.argv[2], '--quiet'])\n"
            "except SystemExit as exit:\n    assert exit.code == 0, exit.code\n"
            "assert 'transformers' not in sys.modules, 'transformers was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code, str(recipe), str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
