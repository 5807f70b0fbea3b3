"""Adapter-space merging (``output: adapter``): the written adapter equals PEFT's
``add_weighted_adapter`` on the same adapters, ``linear``/``cat``/``svd`` equal float64 references
from their formulas, it loads with ``PeftModel.from_pretrained``, and bad inputs are one line."""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml
from conftest import in_process_cli, write_recipe
from safetensors.torch import load_file

import fusekit
from fusekit.errors import CheckpointError, FusekitError, RecipeError
from fusekit.io.lock import verify_output
from fusekit.lora.adapter_recipe import COMBINATIONS

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = {"a1": ["q_proj", "v_proj", "down_proj"], "a2": ["q_proj", "k_proj", "down_proj"],
           "a3": ["q_proj", "v_proj"]}
PREFIX = "base_model.model."


def _base(folder: Path) -> torch.nn.Module:
    return transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


@pytest.fixture(scope="module")
def adapters(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """a1, a2: rank 4 (alpha 8 and 16); a3: rank 2, rsLoRA; all with random (non-zero) A and B."""
    root = tmp_path_factory.mktemp("adapters")
    settings = {"a1": {"r": 4, "lora_alpha": 8}, "a2": {"r": 4, "lora_alpha": 16},
                "a3": {"r": 2, "lora_alpha": 4, "use_rslora": True}}
    for seed, (name, kwargs) in enumerate(settings.items()):
        torch.manual_seed(seed)
        config = peft.LoraConfig(target_modules=TARGETS[name], init_lora_weights=False, **kwargs)
        model = peft.get_peft_model(_base(tiny_models["base"]), config)
        for key, param in model.named_parameters():
            if "lora_B" in key:  # larger B, so the ΔW are well above float32 rounding
                param.data.normal_(0, 0.3)
        model.save_pretrained(str(root / name))
    return {name: root / name for name in settings}


def _recipe(tmp_path: Path, method: str, refs: list[Path], weights: list[float], extra: str = "",
            base: Path | None = None) -> Path:
    models = "\n".join(f"  - {{model: {ref}, parameters: {{weight: {w}}}}}"
                       for ref, w in zip(refs, weights, strict=True))
    head = f"base_model: {base}\n" if base else ""
    return write_recipe(tmp_path / "recipe.yaml",
                        f"output: adapter\nmerge_method: {method}\n{head}{extra}models:\n{models}\n")


def _written_deltas(folder: Path) -> dict[str, torch.Tensor]:
    """ΔW = scaling · B · A of every module of a saved adapter, in float64."""
    config = json.loads((folder / "adapter_config.json").read_text())
    assert not config["use_rslora"]
    scaling = config["lora_alpha"] / config["r"]
    tensors = load_file(folder / "adapter_model.safetensors")
    deltas = {}
    for key, a in tensors.items():
        if key.endswith(".lora_A.weight"):
            module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
            b = tensors[key.replace("lora_A", "lora_B")]
            deltas[module] = scaling * b.double() @ a.double()
    return deltas


def _peft_model(base: Path, refs: list[Path]) -> object:
    model = peft.PeftModel.from_pretrained(_base(base), str(refs[0]), adapter_name="x0")
    for i, ref in enumerate(refs[1:], 1):
        model.load_adapter(str(ref), adapter_name=f"x{i}")
    return model


def _peft_deltas(model: object, name: str) -> dict[str, torch.Tensor]:
    return {key.removeprefix(PREFIX): module.get_delta_weight(name).double()
            for key, module in model.named_modules()  # type: ignore[attr-defined]
            if isinstance(module, peft.tuners.lora.LoraLayer) and name in module.lora_A}


def _peft_merge(base: Path, refs: list[Path], weights: list[float], method: str, *, seed: int,
                **kwargs: object) -> object:
    model = _peft_model(base, refs)
    torch.manual_seed(seed)
    model.add_weighted_adapter([f"x{i}" for i in range(len(refs))], weights, "m",  # type: ignore[attr-defined]
                               combination_type=method, **kwargs)
    return model


def _inputs(adapters: dict[str, Path]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """Per (adapter, module): float64 A, B and scaling, read from the files (rsLoRA honoured)."""
    found = {}
    for name, folder in adapters.items():
        config = json.loads((folder / "adapter_config.json").read_text())
        rank = config["r"]
        scaling = config["lora_alpha"] / (math.sqrt(rank) if config["use_rslora"] else rank)
        for key, a in load_file(folder / "adapter_model.safetensors").items():
            if key.endswith(".lora_A.weight"):
                module = key.removeprefix(PREFIX).removesuffix(".lora_A.weight")
                b = load_file(folder / "adapter_model.safetensors")[key.replace("lora_A", "lora_B")]
                found[f"{name}:{module}"] = (a.double(), b.double(), scaling)
    return found


def _max_diff(ours: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    assert set(ours) == set(reference) and ours
    return max(float((ours[k] - reference[k]).abs().max()) for k in ours)


SETTINGS = {"linear": "", "cat": "", "svd": "rank: 3\n", "ties": "parameters: {density: 0.6}\n",
            "ties_svd": "rank: 3\nparameters: {density: 0.6, majority_sign_method: frequency}\n",
            "dare_linear": "parameters: {density: 0.7}\n", "dare_ties": "parameters: {density: 0.7}\n",
            "dare_linear_svd": "rank: 3\nparameters: {density: 0.7}\n",
            "dare_ties_svd": "rank: 3\nparameters: {density: 0.7}\n",
            "magnitude_prune": "parameters: {density: 0.5}\n",
            "magnitude_prune_svd": "rank: 2\nparameters: {density: 0.5}\n"}


def _peft_kwargs(method: str) -> dict[str, object]:
    kwargs: dict[str, object] = {}
    for line in SETTINGS[method].splitlines():
        if line.startswith("rank:"):
            kwargs["svd_rank"] = int(line.split()[1])
        else:
            kwargs.update(yaml.safe_load(line)["parameters"])
    return kwargs


def test_every_combination_type_is_tested() -> None:
    assert set(SETTINGS) == set(COMBINATIONS)


@pytest.mark.parametrize("method", list(SETTINGS))
def test_written_adapter_equals_peft_add_weighted_adapter(method: str, adapters: dict[str, Path],
                                                         tiny_models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    refs, weights = [adapters["a1"], adapters["a2"]], [0.7, -0.4]
    recipe = _recipe(tmp_path, method, refs, weights, SETTINGS[method], base=tiny_models["base"])
    result = fusekit.merge(recipe, tmp_path / "out", random_seed=11)
    assert result.stats.tensors > 0 and not result.up_to_date
    ours = _written_deltas(tmp_path / "out")
    reference = _peft_deltas(_peft_merge(tiny_models["base"], refs, weights, method, seed=11,
                                         **_peft_kwargs(method)), "m")
    assert _max_diff(ours, reference) < 1e-5
    assert max(float(d.abs().max()) for d in ours.values()) > 0.1  # a real ΔW, not zeros


def test_cat_and_svd_equal_the_float64_formula_rslora_included(adapters: dict[str, Path],
                                                                tiny_models: dict[str, Path],
                                                                tmp_path: Path) -> None:
    """cat: ΔW = Σ wᵢ sᵢ Bᵢ Aᵢ exactly; svd at full rank keeps it; rsLoRA inputs (a3) keep their
    alpha/√r scaling and the output carries exactly the sum (PEFT's own in-memory result is √r too big)."""
    refs, weights = [adapters["a1"], adapters["a3"]], [0.6, 1.5]
    parts = _inputs({"a1": adapters["a1"], "a3": adapters["a3"]})
    expected: dict[str, torch.Tensor] = {}
    for key, (a, b, scaling) in parts.items():
        name, module = key.split(":")
        w = weights[0] if name == "a1" else weights[1]
        expected[module] = expected.get(module, 0) + w * scaling * b @ a
    fusekit.merge(_recipe(tmp_path, "cat", refs, weights), tmp_path / "cat", random_seed=0)
    assert _max_diff(_written_deltas(tmp_path / "cat"), expected) < 1e-5
    fusekit.merge(_recipe(tmp_path, "svd", refs, weights, "rank: 6\n"), tmp_path / "svd", random_seed=0)
    assert _max_diff(_written_deltas(tmp_path / "svd"), expected) < 1e-5
    truncated = {k: _truncate(v, 2) for k, v in expected.items()}
    fusekit.merge(_recipe(tmp_path, "svd", refs, weights, "rank: 2\n"), tmp_path / "svd2", random_seed=0)
    assert _max_diff(_written_deltas(tmp_path / "svd2"), truncated) < 1e-5


def _truncate(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


def test_linear_equals_the_float64_formula(adapters: dict[str, Path], tmp_path: Path) -> None:
    """PEFT's linear: B = Σ √|wᵢsᵢ| Bᵢ, A = Σ sign(wᵢsᵢ) √|wᵢsᵢ| Aᵢ, ΔW = B A (scaling 1)."""
    weights = {"a1": 0.7, "a2": -0.4}
    parts = _inputs({k: adapters[k] for k in weights})
    sums: dict[str, list[torch.Tensor]] = {}
    for key, (a, b, scaling) in parts.items():
        name, module = key.split(":")
        ws = weights[name] * scaling
        factor_a, factor_b = math.copysign(math.sqrt(abs(ws)), ws) * a, math.sqrt(abs(ws)) * b
        if module in sums:
            sums[module] = [sums[module][0] + factor_a, sums[module][1] + factor_b]
        else:
            sums[module] = [factor_a, factor_b]
    expected = {module: b @ a for module, (a, b) in sums.items()}
    fusekit.merge(_recipe(tmp_path, "linear", [adapters[k] for k in weights], list(weights.values())),
                  tmp_path / "out", random_seed=0)
    assert _max_diff(_written_deltas(tmp_path / "out"), expected) < 1e-5


def test_output_loads_with_peft_and_gives_peft_logits(adapters: dict[str, Path], tiny_models: dict[str, Path],
                                                      tmp_path: Path) -> None:
    refs, weights = [adapters["a1"], adapters["a2"]], [1.0, 0.5]
    fusekit.merge(_recipe(tmp_path, "ties_svd", refs, weights, SETTINGS["ties_svd"]), tmp_path / "out",
                  random_seed=3)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: peft" in card and "random_seed" not in card  # ties_svd draws nothing
    assert "base_model:" not in card  # a local base: only Hub ids may go there
    tokens = torch.arange(12).reshape(2, 6) % 64
    loaded = peft.PeftModel.from_pretrained(_base(tiny_models["base"]), str(tmp_path / "out")).eval()
    in_memory = _peft_merge(tiny_models["base"], refs, weights, "ties_svd", seed=3,
                            **_peft_kwargs("ties_svd"))
    in_memory.set_adapter("m")  # type: ignore[attr-defined]
    with torch.no_grad():
        base_logits = _base(tiny_models["base"])(tokens).logits
        ours, theirs = loaded(tokens).logits, in_memory.eval()(tokens).logits  # type: ignore[attr-defined]
    assert float((ours - theirs).abs().max()) < 1e-5
    assert float((ours - base_logits).abs().max()) > 1e-3  # the adapter does something


def test_adapter_output_is_locked_up_to_date_and_verifiable(adapters: dict[str, Path],
                                                            tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "dare_linear", [adapters["a1"], adapters["a2"]], [1.0, 1.0],
                     SETTINGS["dare_linear"])
    first = fusekit.merge(recipe, tmp_path / "out")
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "fusekit.lock",
                     "fusekit_recipe.yml"]
    lock = json.loads((tmp_path / "out" / "fusekit.lock").read_text())
    assert lock["random_seed"] == first.seed and len(lock["inputs"]) == 3  # base config + two adapters
    again = fusekit.merge(recipe, tmp_path / "out", locked=True)
    assert again.up_to_date and again.seed == first.seed
    verify_output(tmp_path / "out")  # what fusekit push checks
    (tmp_path / "out" / "adapter_model.safetensors").write_bytes(b"changed")
    with pytest.raises(FusekitError, match="out of date"):
        fusekit.merge(recipe, tmp_path / "out")


def test_plan_refuses_an_adapter_recipe(adapters: dict[str, Path], tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, "cat", [adapters["a1"], adapters["a2"]], [1.0, 1.0])
    with pytest.raises(RecipeError, match="no tensor plan"):
        fusekit.plan_merge(recipe)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    return in_process_cli(capsys)


@pytest.fixture(scope="module")
def odd_adapters(adapters: dict[str, Path], tiny_models: dict[str, Path],
                 tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Copies of a1 that break one rule each: over another base, DoRA, a regex target."""
    root = tmp_path_factory.mktemp("odd")
    changes = {"other_base": {"base_model_name_or_path": str(tiny_models["math"])},
               "dora": {"use_dora": True}, "regex": {"target_modules": ".*q_proj"}}
    for name, change in changes.items():
        (root / name).mkdir()
        config = json.loads((adapters["a1"] / "adapter_config.json").read_text())
        (root / name / "adapter_config.json").write_text(json.dumps({**config, **change}))
        (root / name / "adapter_model.safetensors").write_bytes(
            (adapters["a1"] / "adapter_model.safetensors").read_bytes())
    return {name: root / name for name in changes}


def _bad_cases(adapters: dict[str, Path], odd: dict[str, Path], models: dict[str, Path]) -> Iterator[tuple]:
    a1, a2, a3 = adapters["a1"], adapters["a2"], adapters["a3"]
    yield "cat", [a1, models["math"]], "", r"models\[1\] .* is a full model, not a LoRA adapter"
    yield "cat", [a1, odd["other_base"]], "", r"models\[1\] .* applies to base .*one base"
    yield "svd", [a1, a2], "rank: 40\n", r"rank 40 is above min\(out, in\) = \d+ of targeted module 'model"
    yield "catt", [a1, a2], "", "not a PEFT combination type .*did you mean 'cat'.*linear, cat, svd"
    yield "svd", [a1, a2], "", "svd .* needs 'rank"
    yield "cat", [a1, a2], "rank: 4\n", "cat does not take 'rank'"
    yield "ties", [a1, a2], "", "needs 'density'"
    yield "cat", [a1, odd["dora"]], "", "uses DoRA"
    yield "cat", [a1, odd["regex"]], "", "target_modules as a regex"
    yield "linear", [a1, a3], "", "linear needs every adapter at one rank"


def test_bad_inputs_are_one_line_and_write_nothing(adapters: dict[str, Path], odd_adapters: dict[str, Path],
                                                   tiny_models: dict[str, Path], tmp_path: Path,
                                                   cli: Callable[..., tuple[int, str, str]]) -> None:
    for method, refs, extra, message in _bad_cases(adapters, odd_adapters, tiny_models):
        recipe = _recipe(tmp_path, method, refs, [1.0] * len(refs), extra)
        code, out, err = cli("merge", str(recipe), str(tmp_path / "out"))
        assert code == 2, (method, err)
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and re.search(message, lines[0]), (message, err)
        assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_missing_peft_is_one_line_naming_the_extra(adapters: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "peft", None)
    recipe = _recipe(tmp_path, "cat", [adapters["a1"], adapters["a2"]], [1.0, 1.0])
    with pytest.raises(FusekitError, match=r"needs peft.*pip install 'peft>=0\.13'"):
        fusekit.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rank_only_with_output_adapter(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nrank: 4\nmodels: [{model: a}]\n")
    with pytest.raises(RecipeError, match="'rank' applies to 'output: adapter' only"):
        fusekit.plan_merge(recipe)
    assert CheckpointError  # the adapter errors above are CheckpointErrors (exit 2 like every user error)
