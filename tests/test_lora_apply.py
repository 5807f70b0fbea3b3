"""LoRA adapters applied while streaming: parity with PEFT's ``merge_and_unload`` bit for bit,
row blocks, merges over adapters, bad adapters, and the merge path's imports.

Adapters are trained nowhere: PEFT builds them on the session's tiny models with random (non-zero)
A and B, DoRA magnitudes and saved modules are perturbed, and each is saved and merged by PEFT in
the test; fusekit's reader must give the same bits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import load_weights, write_recipe
from test_hub_and_pickle import COMMIT, OTHER_COMMIT, add_to_cache, hub_cache  # noqa: F401 (a fixture)

import fusekit
from fusekit.errors import FusekitError
from fusekit.io.reader import open_reader
from fusekit.io.refs import resolve_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

Adapter = tuple[Path, Path, dict[str, torch.Tensor]]  # (base, adapter folder, PEFT's merged state dict)
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
CASES: dict[str, dict[str, Any]] = {
    "plain": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "rslora": {"r": 4, "lora_alpha": 6, "use_rslora": True, "target_modules": LLAMA_ALL},
    "patterns": {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_ALL,
                 "rank_pattern": {"q_proj": 2, r"layers\.1\.mlp\.down_proj": 6},
                 "alpha_pattern": {"v_proj": 3, "up_proj": 12}},
    "dora": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["q_proj", "down_proj"]},
    "dora_embedding": {"r": 4, "lora_alpha": 8, "use_dora": True, "target_modules": ["embed_tokens"]},
    "modules_to_save": {"r": 4, "lora_alpha": 8, "target_modules": ["k_proj"],
                        "modules_to_save": ["lm_head"]},
    "embedding": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "o_proj"]},
}
GPT2_CASES: dict[str, dict[str, Any]] = {
    "gpt2_bias_all": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_fc"], "bias": "all",
                      "lora_bias": True, "fan_in_fan_out": True},
    "gpt2_dora": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn", "c_proj"], "use_dora": True,
                  "fan_in_fan_out": True},
}


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Make every trainable tensor (A, B, magnitudes, saved modules, biases) random and non-zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                noise = torch.randn(param.shape, generator=generator) * 0.2
                param.add_(noise if "lora_" in name or "modules_to_save" in name else noise * 0.1)


def make_adapter(base: Path, out: Path, seed: int = 0, **options: Any) -> dict[str, torch.Tensor]:
    """Save a PEFT adapter over ``base`` into ``out``; return PEFT's merged state dict of it."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **options))
    _perturb(peft_model, seed)
    peft_model.save_pretrained(out)
    fresh = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(fresh, out).merge_and_unload()
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}


@pytest.fixture(scope="session")
def gpt2_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GPT-2 (Conv1D layers: fan_in_fan_out; biases) saved as safetensors."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32)
    folder = tmp_path_factory.mktemp("gpt2") / "base"
    GPT2LMHeadModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def adapters(tiny_models: dict[str, Path], gpt2_base: Path,
             tmp_path_factory: pytest.TempPathFactory) -> dict[str, Adapter]:
    """case → (base folder, adapter folder, PEFT's merged state dict)."""
    root = tmp_path_factory.mktemp("adapters")
    found = {}
    for seed, (case, options) in enumerate({**CASES, **GPT2_CASES}.items()):
        base = gpt2_base if case in GPT2_CASES else tiny_models["base"]
        found[case] = (base, root / case, make_adapter(base, root / case, seed=seed, **options))
    return found


@pytest.mark.parametrize("case", [*CASES, *GPT2_CASES])
def test_reader_equals_peft_merge_and_unload(case: str, adapters: dict[str, Any]) -> None:
    base, adapter, merged = adapters[case]
    with open_reader(resolve_model(f"{base}+{adapter}")) as reader:
        changed = 0
        for name in reader.names():
            expected = merged[name]
            got = reader.get(name)
            assert got.dtype == expected.dtype, name
            assert torch.equal(got, expected), f"{case}: {name} differs by {(got - expected).abs().max()}"
            with open_reader(resolve_model(str(base))) as plain:
                changed += not torch.equal(plain.get(name), got)
    assert changed >= 1  # the adapter did change tensors (the test can fail)


@pytest.mark.parametrize("case", ["plain", "dora", "dora_embedding", "embedding", "gpt2_dora"])
def test_row_blocks_equal_whole_reads(case: str, adapters: dict[str, Any]) -> None:
    base, adapter, _ = adapters[case]
    with open_reader(resolve_model(f"{base}+{adapter}")) as reader:
        for name in reader.names():
            whole = reader.get(name)
            rows = whole.shape[0] if whole.dim() > 1 else 0
            if rows < 3:
                continue
            cuts = [0, 1, rows // 2, rows]
            blocks = [reader.get(name, (a, b)) for a, b in zip(cuts, cuts[1:], strict=False)]
            assert torch.equal(torch.cat(blocks), whole), name
            assert reader.nbytes(name, (0, 1)) * rows == reader.nbytes(name)


@pytest.mark.parametrize("method", ["passthrough", "linear"])
def test_merge_of_base_plus_adapter_equals_merge_and_unload(method: str, adapters: dict[str, Any],
                                                            tmp_path: Path) -> None:
    base, adapter, merged = adapters["dora"]
    recipe = _recipe(tmp_path, f"{base}+{adapter}", method, "dtype: float32\n")
    fusekit.merge(recipe, tmp_path / "out", max_memory=None)
    written = load_weights(tmp_path / "out")
    assert written.keys() == merged.keys()
    for name, tensor in written.items():
        assert torch.equal(tensor, merged[name]), name


def test_merge_in_row_blocks_equals_whole(adapters: dict[str, Any], tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A bound small enough to cut tensors into row blocks gives the same bytes as no bound."""
    base, adapter, merged = adapters["gpt2_dora"]
    recipe = _recipe(tmp_path, f"{base}+{adapter}", "linear", "dtype: float32\n")
    from fusekit.plan import memory
    from fusekit.plan.memory import split_units

    plan = fusekit.plan_merge(recipe)
    assert any(u.rows is not None for u in split_units(plan, 4 * 4096))  # it does cut rows
    monkeypatch.setattr(memory, "MIN_WORKING_BYTES", 4 * 4096)
    monkeypatch.setattr(memory, "current_rss_bytes", lambda: 0)
    fusekit.merge(recipe, tmp_path / "out", max_memory=4 * 4096, pipelined=True)
    written = load_weights(tmp_path / "out")
    for name, tensor in written.items():
        assert torch.equal(tensor, merged[name]), name


def _recipe(folder: Path, ref: str, method: str = "passthrough", extra: str = "") -> Path:
    """A one-model recipe over ``ref``."""
    weight = "" if method == "passthrough" else "    parameters: {weight: 1.0}\n"
    text = f"merge_method: {method}\n{extra}models:\n  - model: {ref}\n{weight}"
    return write_recipe(folder / "r.yaml", text)


def _delta64(adapter: Path, module: str, scaling: float) -> torch.Tensor:
    """scaling · B · A in float64, read straight from the adapter file."""
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    return scaling * tensors[f"{key}.lora_B.weight"].double() @ tensors[f"{key}.lora_A.weight"].double()


def test_full_rank_ties_over_adapters(adapters: dict[str, Any], tmp_path: Path) -> None:
    """TIES over base+a1 and base+a2 merges the ΔW of the adapters (density 1: sign election only)."""
    base, plain, _ = adapters["plain"]
    _, rslora, _ = adapters["rslora"]
    recipe = write_recipe(tmp_path / "r.yaml", f"""\
merge_method: ties
base_model: {base}
dtype: float32
parameters: {{density: 1.0}}
models:
  - model: {base}+{plain}
    parameters: {{weight: 1.0}}
  - model: {rslora}
    parameters: {{weight: 0.5}}
""")  # the second is a bare adapter: applied to the recipe's base_model
    fusekit.merge(recipe, tmp_path / "out", max_memory=None)
    written, original = load_weights(tmp_path / "out"), load_weights(base)
    module = "model.layers.1.self_attn.v_proj"
    taus = torch.stack([_delta64(plain, module, 8 / 4), _delta64(rslora, module, 6 / 4 ** 0.5)])
    weights = torch.tensor([1.0, 0.5], dtype=torch.float64).view(2, 1, 1)
    elected = torch.where((weights * taus).sum(0) >= 0, 1.0, -1.0).double()
    agree = (taus.sign() == elected).double()
    mixed = (weights * taus * agree).sum(0) / (weights * agree).sum(0)
    expected = original[f"{module}.weight"].double() + mixed
    torch.testing.assert_close(written[f"{module}.weight"].double(), expected, rtol=0, atol=2e-6)
    module = "model.layers.0.mlp.up_proj"  # only the rsLoRA adapter changes it
    expected = original[f"{module}.weight"].double() + _delta64(rslora, module, 6 / 4 ** 0.5)
    torch.testing.assert_close(written[f"{module}.weight"].double(), expected, rtol=0, atol=2e-6)


def _broken(adapters: dict[str, Any], tmp_path: Path, edit: Callable[[Path], None]) -> tuple[Path, Path]:
    """A copy of the "plain" adapter changed by ``edit``; (base, adapter)."""
    import shutil

    base, adapter, _ = adapters["plain"]
    copy = tmp_path / "adapter"
    shutil.copytree(adapter, copy)
    edit(copy)
    return base, copy


def _edit_config(**changes: Any) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return edit


def _edit_tensor(old: str, new: str, shape: tuple[int, ...] | None = None) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        from safetensors.torch import load_file, save_file

        path = folder / "adapter_model.safetensors"
        tensors = load_file(path)
        tensor = tensors.pop(old)
        tensors[new] = torch.ones(shape) if shape else tensor
        save_file(tensors, path)
    return edit


Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
Q_A = Q_B.replace("lora_B", "lora_A")
BAD_ADAPTERS = {
    "shape": (_edit_tensor(Q_B, Q_B, (48, 4)),
              ["model.layers.0.self_attn.q_proj.weight", "[48, 32]", "[32, 32]"]),
    "missing_tensor": (lambda folder: (
        _edit_tensor(Q_B, Q_B.replace("q_proj", "zz_proj"))(folder),
        _edit_tensor(Q_A, Q_A.replace("q_proj", "zz_proj"))(folder)),
        ["zz_proj", "does not have"]),
    "rank": (_edit_config(r=8), ["rank 4", "r=8"]),
    "no_weights": (lambda folder: (folder / "adapter_model.safetensors").unlink(),
                   ["adapter_model.safetensors"]),
    "other_base_shape": (lambda folder: (_edit_config(base_model_name_or_path="org/other")(folder),
                                         _edit_tensor(Q_B, Q_B, (48, 4))(folder)), ["[48, 32]", "org/other"]),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapter_is_one_line_and_writes_nothing(case: str, adapters: dict[str, Adapter],
                                                    tmp_path: Path) -> None:
    edit, words = BAD_ADAPTERS[case]
    base, adapter = _broken(adapters, tmp_path, edit)
    recipe = _recipe(tmp_path, f"{base}+{adapter}")
    with pytest.raises(FusekitError) as caught:
        fusekit.merge(recipe, tmp_path / "out")
    message = str(caught.value)
    assert "\n" not in message and all(w in message for w in words), message
    assert not (tmp_path / "out").exists()


def test_adapter_trained_on_another_base_warns_when_shapes_match(adapters: dict[str, Any], tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    base, adapter = _broken(adapters, tmp_path, _edit_config(base_model_name_or_path="org/other-model"))
    recipe = _recipe(tmp_path, f"{base}+{adapter}")
    fusekit.merge(recipe, tmp_path / "out")
    assert "org/other-model" in caplog.text and "trained on" in caplog.text


def test_unsupported_peft_type_through_the_cli(adapters: dict[str, Adapter], tmp_path: Path,
                                               run_cli: Callable[..., Any]) -> None:
    base, adapter = _broken(adapters, tmp_path, _edit_config(peft_type="LOHA"))
    recipe = _recipe(tmp_path, f"{base}+{adapter}")
    result = run_cli("merge", recipe, tmp_path / "out")
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'LOHA'" in lines[0] and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_merge_with_an_adapter_imports_no_peft_or_transformers(adapters: dict[str, Adapter],
                                                              tmp_path: Path) -> None:
    base, adapter, _ = adapters["dora"]
    recipe = _recipe(tmp_path, f"{base}+{adapter}", "linear")
    code = ("import sys, fusekit; fusekit.merge(sys.argv[1], sys.argv[2]); "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('peft', 'transformers')); "
            "assert not bad, bad")
    result = subprocess.run([sys.executable, "-c", code, str(recipe), str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "out").is_dir()


def test_lock_card_and_plan_name_the_adapter(adapters: dict[str, Adapter], tmp_path: Path) -> None:
    """The lock hashes the adapter's files (changing one makes --locked refuse), the card names the
    base and tags lora, and the plan reports the adapter's ranks, alpha, DoRA and modules."""
    from fusekit.errors import LockMismatchError
    from fusekit.io.files import file_sha256
    from fusekit.plan.report import format_plan, plan_summary

    base, adapter = _broken(adapters, tmp_path, lambda folder: None)
    recipe = _recipe(tmp_path, f"{base}+{adapter}")
    fusekit.merge(recipe, tmp_path / "out")
    lock = json.loads((tmp_path / "out" / "fusekit.lock").read_text())
    (entry,) = [e for e in lock["inputs"].values() if "adapter/adapter_model.safetensors" in e["files"]]
    weights = adapter / "adapter_model.safetensors"
    assert entry["files"]["adapter/adapter_model.safetensors"]["sha256"] == file_sha256(weights)
    assert "adapter/adapter_config.json" in entry["files"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert "- lora" in card and "applied to `" in card
    plan = fusekit.plan_merge(recipe)
    summary = plan_summary(plan, max_shard_bytes=None, max_memory=None)
    (described,) = [m["adapter"] for m in summary["models"].values()]
    assert described["ranks"] == [4] and described["alphas"] == [8.0] and not described["dora"]
    assert described["modules"] == 4 and described["module_names"] == ["q_proj", "v_proj"]
    assert "rank 4, alpha 8, 4 module(s) (q_proj, v_proj)" in format_plan(plan, max_shard_bytes=None,
                                                                          max_memory=None)
    config = adapter / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "lora_alpha": 16}))
    with pytest.raises(LockMismatchError, match="adapter/adapter_config.json"):
        fusekit.merge(recipe, tmp_path / "again", locked=True, lock_file=tmp_path / "out" / "fusekit.lock")


def test_memory_model_counts_the_delta(adapters: dict[str, Adapter], tmp_path: Path) -> None:
    from fusekit.plan.memory import split_units

    base, adapter, _ = adapters["dora"]
    plan = fusekit.plan_merge(_recipe(tmp_path, f"{base}+{adapter}"))
    units = {u.task.output: u for u in split_units(plan, None)}
    assert units["model.layers.0.self_attn.q_proj.weight"].delta_bytes == 32 * 32 * 4 * 2  # ΔW + DoRA's W
    assert units["model.layers.0.self_attn.k_proj.weight"].delta_bytes == 0


def test_hub_adapters_resolve_offline(adapters: dict[str, Adapter], hub_cache: Path) -> None:  # noqa: F811
    import shutil

    base, adapter, merged = adapters["plain"]
    copy = hub_cache.parent / "adapter-copy"
    shutil.copytree(adapter, copy)
    _edit_config(base_model_name_or_path="org/base")(copy)
    add_to_cache(hub_cache, "org/base", base, COMMIT)
    add_to_cache(hub_cache, "org/adapter", copy, OTHER_COMMIT)
    name = "model.layers.1.self_attn.v_proj.weight"
    for ref in ("org/adapter", f"org/base+org/adapter@{OTHER_COMMIT}"):
        resolved = resolve_model(ref)
        assert resolved.hub_id == "org/base" and resolved.adapter is not None
        assert resolved.adapter.hub_id == "org/adapter" and resolved.adapter.revision == OTHER_COMMIT
        with open_reader(resolved) as reader:
            assert torch.equal(reader.get(name), merged[name])
