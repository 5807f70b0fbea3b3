"""Demo LoRA experts: a tiny build through the script, adapters PEFT loads, specialisation, determinism."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
import torch
from safetensors.torch import load_file

from fusekit.demo import DOMAINS, QUICK, ExpertSet, LoraSet, LoraSettings, load_expert_set, load_lora_set
from fusekit.demo.lora import LORA_TARGETS, train_lora
from fusekit.demo.training import TrainingJob, domain_mixture
from fusekit.errors import OutputExistsError
from fusekit.lm import load_lm

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@dataclass(frozen=True)
class Built:
    experts: ExpertSet
    lora: LoraSet
    table: dict[str, dict[str, float]]  # what the script printed


def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("make_demo_experts", ROOT / "scripts/make_demo_experts.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    """``make_demo_experts.py OUT --quick --lora``, its table parsed."""
    out = tmp_path_factory.mktemp("demo-lora") / "out"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(io.StringIO()):
        assert _script().main([str(out), "--quick", "--lora"]) == 0
    lines = printed.getvalue().splitlines()
    columns = lines[1].split()[1:]
    table = {}
    for line in lines[2:]:
        parts = line.split()
        name, values = " ".join(parts[:-len(columns)]), map(float, parts[-len(columns):])
        table[name] = dict(zip(columns, values, strict=True))
    return Built(load_expert_set(out), load_lora_set(out / "lora"), table)


def test_layout_and_configs(built: Built) -> None:
    lora = built.lora
    assert lora.root == built.experts.root / "lora" and lora.base == built.experts.base
    assert lora.adapters == {d: lora.root / d for d in DOMAINS}
    assert lora.info["settings"] == dataclasses.asdict(LoraSettings())
    for domain, folder in lora.adapters.items():
        config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
        assert sorted(config["target_modules"]) == sorted(LORA_TARGETS)
        assert config["base_model_name_or_path"] == str(built.experts.base)
        tensors = load_file(folder / "adapter_model.safetensors")
        # every targeted linear of each layer, A and B; training moved B off PEFT's zero init
        assert len(tensors) == 2 * len(LORA_TARGETS) * QUICK.layers, domain
        assert all(t.abs().max() > 0 for name, t in tensors.items() if "lora_B" in name)


def test_peft_loads_each_adapter_and_load_lm_applies_it(built: Built) -> None:
    import peft
    from transformers import AutoModelForCausalLM

    for domain, folder in built.lora.adapters.items():
        base = AutoModelForCausalLM.from_pretrained(built.experts.base, dtype=torch.float32)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            merged = peft.PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
        assert not [w for w in caught if "missing adapter keys" in str(w.message)], domain
        ours = load_lm(folder, tokenizer=False).model.state_dict()  # the config names the base
        assert all(torch.equal(ours[name], value) for name, value in merged.state_dict().items())


def test_each_adapter_lowers_its_domain_loss_against_the_base(built: Built) -> None:
    table = built.table
    assert list(table) == ["base", *(row for d in DOMAINS for row in (d, f"{d} lora"))]
    for domain in DOMAINS:
        assert table[f"{domain} lora"][domain] < table["base"][domain], table
    assert all(0 < value < 20 for row in table.values() for value in row.values())


def test_a_second_build_refuses_an_existing_lora_folder(built: Built) -> None:
    from fusekit.demo import build_demo_lora

    with pytest.raises(OutputExistsError, match="--overwrite"):
        build_demo_lora(built.experts)


def test_training_is_deterministic_given_the_seed(built: Built, tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(0)
    streams = {d: torch.randint(4, 300, (400,), generator=gen) for d in DOMAINS}
    sizes = dataclasses.replace(QUICK, lr=1e-2)

    def run(seed: int, name: str) -> dict[str, torch.Tensor]:
        job = TrainingJob("python", domain_mixture("python"), streams, sizes, 3, 320, seed, tmp_path / name,
                          built.experts.base)
        train_lora(job, settings=LoraSettings(rank=2, alpha=4), base=str(built.experts.base))
        config = json.loads((tmp_path / name / "adapter_config.json").read_text(encoding="utf-8"))
        assert config["base_model_name_or_path"] == str(built.experts.base) and config["r"] == 2
        return load_file(tmp_path / name / "adapter_model.safetensors")

    first, again, other = run(0, "a"), run(0, "b"), run(1, "c")
    assert (tmp_path / "a/adapter_model.safetensors").read_bytes() == (
        tmp_path / "b/adapter_model.safetensors").read_bytes()
    assert sorted(first) == sorted(again) == sorted(other)
    assert any(not first[k].equal(other[k]) for k in first)
