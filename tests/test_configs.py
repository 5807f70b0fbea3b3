"""Everything shipped runs: every recipe in configs/ and every fusekit command in the README."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

import fusekit
import fusekit.ops
import fusekit.recipe
from fusekit.demo import build_demo_models
from fusekit.recipe import load_merge_recipe

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
EXAMPLES = sorted(CONFIGS.glob("*.yaml"))  # merge recipes runnable on the demo models
ALL_RECIPES = sorted(CONFIGS.rglob("*.yaml"))  # parity/ recipes need their own models
README = (ROOT / "README.md").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def demo_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder laid out like the repo after the demo: configs/, demo-out/models/, demo-out/experts/."""
    root = tmp_path_factory.mktemp("demo")
    build_demo_models(root / "demo-out" / "models", hidden_size=32, num_layers=4,
                      num_attention_heads=4, num_key_value_heads=2)
    from fusekit.demo import build_demo_experts  # quick experts: same layout as the full set

    build_demo_experts(root / "demo-out" / "experts", quick=True)
    shutil.copytree(ROOT / "configs", root / "configs")
    return root


def test_there_are_example_recipes() -> None:
    assert len(EXAMPLES) >= 4


def _validate_merge_recipe(recipe: Path) -> None:
    from fusekit.recipe.stages import is_multistage, load_stages

    if is_multistage(recipe):  # several stages: each is a merge recipe
        assert all(s.recipe.merge_method in fusekit.ops.method_names() for s in load_stages(recipe).stages)
        return
    parsed, _ = load_merge_recipe(recipe)
    assert parsed.merge_method in fusekit.ops.method_names()


def _validate_moe_recipe(recipe: Path) -> None:
    from fusekit.moe import load_moe_recipe

    parsed, _, _ = load_moe_recipe(recipe)
    assert parsed.experts


def _validate_route_recipe(recipe: Path) -> None:
    from fusekit.route import load_route_recipe

    parsed, _ = load_route_recipe(recipe)
    assert parsed.models and (parsed.data or parsed.router.type == "arrow")  # arrow needs no data


def _validate_ensemble_recipe(recipe: Path) -> None:
    from fusekit.ensemble import load_ensemble_recipe

    parsed, _ = load_ensemble_recipe(recipe)
    assert parsed.models


def _validate_tune_recipe(recipe: Path) -> None:
    from fusekit.tune.spec import load_tune_spec

    assert load_tune_spec(recipe).space.dims


def _validate_serve_config(config: Path) -> None:
    from fusekit.serve.config import load_serve_config

    assert load_serve_config(config).models


def _validate_adapter_recipe(recipe: Path) -> None:
    """configs/lora/: ``output: adapter`` merges, whose methods are PEFT's combination types, and
    full-model merges over ``base+adapter`` references."""
    from fusekit.lora.adapter_recipe import COMBINATIONS

    parsed, _ = load_merge_recipe(recipe)
    if parsed.output != "adapter":
        _validate_merge_recipe(recipe)
        return
    assert parsed.merge_method in COMBINATIONS


def _validate_ci(path: Path) -> None:
    """configs/ci/: merge recipes, and GitHub Actions workflows that rebuild and push them."""
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    if "jobs" not in data:
        _validate_merge_recipe(path)
        return
    triggers = data.get("on", data.get(True))  # YAML 1.1 reads the key `on` as true
    steps = [step for job in data["jobs"].values() for step in job["steps"]]
    env = {k: str(v) for job in data["jobs"].values() for k, v in job.get("env", {}).items()}
    runs = "\n".join(step.get("run", "") for step in steps)
    recipe = Path(env["RECIPE"])
    assert recipe.as_posix() in triggers["push"]["paths"], "a recipe change must trigger a rebuild"
    _validate_merge_recipe(CONFIGS.parent / recipe)
    caches = [step["with"]["path"] for step in steps if step.get("uses", "").startswith("actions/cache")]
    assert any(".hf-home/hub" in c for c in caches) and env["HF_HOME"].endswith(".hf-home")
    assert env["HF_TOKEN"] == "${{ secrets.HF_TOKEN }}" and "echo $HF_TOKEN" not in runs
    assert "fusekit merge" in runs and "--push-to-hub" in runs and "--locked" in runs


# configs/*.yaml are merge recipes; each subfolder holds one kind of file, checked by its loader.
VALIDATORS: dict[str, Callable[[Path], None]] = {
    "ci": _validate_ci,
    "ensemble": _validate_ensemble_recipe,
    "lora": _validate_adapter_recipe,
    "moe": _validate_moe_recipe,
    "": _validate_merge_recipe,
    "parity": _validate_merge_recipe,
    "route": _validate_route_recipe,
    "serve": _validate_serve_config,
    "tune": _validate_tune_recipe,
}


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_recipe_validates(recipe: Path) -> None:
    kind = recipe.relative_to(CONFIGS).parts[0] if recipe.parent != CONFIGS else ""
    assert kind in VALIDATORS, f"configs/{kind}/ has no validator in tests/test_configs.py"
    VALIDATORS[kind](recipe)


@pytest.mark.parametrize("recipe", EXAMPLES, ids=lambda p: p.name)
def test_example_recipe_merges(recipe: Path, demo_tree: Path, monkeypatch: pytest.MonkeyPatch,
                               tmp_path: Path) -> None:
    monkeypatch.chdir(demo_tree)
    result = fusekit.merge(Path("configs") / recipe.name, tmp_path / "out")
    assert (tmp_path / "out" / "config.json").is_file()
    assert result.stats.tensors == len(result.plan.tasks) > 0


def _readme_commands() -> list[str]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [line for line in lines if line.startswith("fusekit ")]


def test_readme_lists_commands() -> None:
    assert len(_readme_commands()) >= 4


@pytest.mark.parametrize("command", _readme_commands())
def test_readme_command_runs(command: str, demo_tree: Path) -> None:
    args = command.split()[1:]
    proc = subprocess.run([sys.executable, "-m", "fusekit", *args, *(
        ["--overwrite"] if args[0] == "merge" and "--overwrite" not in args else [])],
        cwd=demo_tree, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr


def test_readme_python_example_runs(demo_tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    code = re.search(r"```python\n(.*?)```", README, flags=re.S)
    assert code is not None
    shutil.rmtree(demo_tree / "merged", ignore_errors=True)
    monkeypatch.chdir(demo_tree)
    exec(compile(code.group(1), "README.md", "exec"), {})
    assert (demo_tree / "merged" / "model.safetensors").is_file()


def test_readme_documents_every_method_and_key() -> None:
    rows = {line.split("|")[1].strip(" `"): line for line in README.splitlines()
            if line.startswith("| `")}
    for name in fusekit.ops.method_names():
        assert name in rows, f"README's method table lacks {name}"
        method = fusekit.ops.get_method(name)
        for parameter in method.parameter_names():
            assert f"`{parameter}`" in rows[name], f"README's {name} row lacks {parameter}"
    for key in fusekit.recipe.MergeRecipe.model_fields:
        assert f"`{key}`" in README, f"README's recipe table lacks {key}"
