"""``fusekit lora extract``: the adapter reconstructs the fine-tune, picks ranks by energy as the
singular values say, loads in PEFT with the fine-tune's logits, and refuses bad input with one line.

References are float64 SVDs and differences computed here from the checkpoints' tensors.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fusekit.lora.extract import extract_lora, short_names
from fusekit.lora.svd import energy_rank, randomized_svd, truncated_svd
from tests.conftest import in_process_cli, load_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pair(tiny_models: dict[str, Path]) -> tuple[Path, Path]:
    """A base and its fine-tune: every matrix and every norm differs."""
    return tiny_models["base"], tiny_models["math"]


@pytest.fixture(scope="module")
def tied_pair(tied_models: dict[str, Path]) -> tuple[Path, Path]:
    return tied_models["base"], tied_models["math"]

NORMS = ["input_layernorm", "norm", "post_attention_layernorm"]  # modules_to_save names of the norms


def _deltas(base: Path, tuned: Path) -> dict[str, torch.Tensor]:
    """Every 2-D ΔW in float64, by module name."""
    b, t = load_weights(base), load_weights(tuned)
    return {k.removesuffix(".weight"): t[k].double() - b[k].double() for k in b if b[k].dim() == 2}


def _reference_rank(delta: torch.Tensor, energy: float) -> int:
    s = torch.linalg.svdvals(delta)
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
    return int((share < energy).sum()) + 1


def _product(weights: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """ΔW as the adapter holds it, in float64, (out, in) as the model stores the weight."""
    key = f"base_model.model.{module}"
    if f"{key}.lora_embedding_A" in weights:
        return (weights[f"{key}.lora_embedding_B"].double() @ weights[f"{key}.lora_embedding_A"].double()).T
    return weights[f"{key}.lora_B.weight"].double() @ weights[f"{key}.lora_A.weight"].double()


def test_full_rank_reconstructs_the_fine_tune(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    result = extract_lora(str(base), str(tuned), tmp_path / "a", energy=1.0)
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    deltas = _deltas(base, tuned)
    lora = [m for m in result.modules if m.kind == "lora"]
    assert len(lora) == 14 and result.total_relative_error < 1e-6
    for m in lora:
        assert m.rank == min(m.shape)
        assert torch.allclose(_product(weights, m.module), deltas[m.module], rtol=0, atol=1e-6), m.module
    tuned_w = load_weights(tuned)
    whole = [k for k, v in tuned_w.items() if v.dim() == 1 or "embed" in k or "lm_head" in k]
    assert len(whole) == 7
    for name in whole:  # modules_to_save: stored whole
        assert torch.equal(weights[f"base_model.model.{name}"], tuned_w[name])
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == sorted(["embed_tokens", "lm_head", *NORMS])
    assert config["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                               "up_proj", "down_proj"])
    assert config["r"] == config["lora_alpha"] == 32 and config["rank_pattern"] == config["alpha_pattern"]
    assert config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 16


@pytest.mark.parametrize(("svd", "slack"), [("exact", 1e-4), ("randomized", 0.02)])
def test_a_fixed_rank_is_the_best_rank_r_approximation(pair: tuple[Path, Path], tmp_path: Path,
                                                       svd: str, slack: float) -> None:
    base, tuned = pair
    result = extract_lora(str(base), str(tuned), tmp_path / "a", rank=4, embeddings="skip", svd=svd)
    lora = [m for m in result.modules if m.kind == "lora"]
    assert len(lora) == 14
    for m, delta in ((m, _deltas(base, tuned)[m.module]) for m in lora):
        s = torch.linalg.svdvals(delta)
        optimal = float((s[4:] ** 2).sum().sqrt() / (s ** 2).sum().sqrt())  # Eckart–Young
        assert m.rank == 4 and m.method == svd, m.module
        assert optimal * (1 - 1e-4) <= m.relative_error <= optimal * (1 + slack), m.module
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {} and config["modules_to_save"] == NORMS


@pytest.mark.parametrize(("energy", "max_rank"), [(0.9, None), (0.9, 10)])
def test_energy_picks_the_rank_the_singular_values_give(pair: tuple[Path, Path], tmp_path: Path,
                                                        energy: float, max_rank: int | None) -> None:
    base, tuned = pair
    result = extract_lora(str(base), str(tuned), tmp_path / "a", energy=energy, max_rank=max_rank,
                          embeddings="lora")
    deltas = _deltas(base, tuned)
    ranks = {m.module: m.rank for m in result.modules if m.kind != "full"}
    expected = {k: min(_reference_rank(d, energy), max_rank or 10**6) for k, d in deltas.items()}
    assert ranks == expected
    assert len(set(ranks.values())) > 1  # the ranks do differ, so the patterns are exercised
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["r"] == max(ranks.values())
    assert config["rank_pattern"] == {k: r for k, r in ranks.items() if r != config["r"]}
    weights = load_file(tmp_path / "a" / "adapter_model.safetensors")
    assert weights["base_model.model.model.embed_tokens.lora_embedding_A"].shape == (
        ranks["model.embed_tokens"], 64)


def _peft_logits(base: Path, adapter: Path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        return peft.PeftModel.from_pretrained(model, adapter).eval()(ids).logits


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("embeddings", ["full", "lora"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_peft_loads_the_adapter_with_the_fine_tunes_logits(request: pytest.FixtureRequest, tmp_path: Path,
                                                           embeddings: str, tied: bool) -> None:
    base, tuned = request.getfixturevalue("tied_pair" if tied else "pair")
    extract_lora(str(base), str(tuned), tmp_path / "a", energy=1.0, embeddings=embeddings)
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    expected, got = _logits(tuned, ids), _peft_logits(base, tmp_path / "a", ids)
    assert not torch.allclose(_logits(base, ids), expected, atol=1e-3)  # the fine-tune does differ
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; the CPU path is tested above")
def test_cuda_extraction_matches_the_cpu(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    on_cpu = extract_lora(str(base), str(tuned), tmp_path / "cpu", energy=0.9, embeddings="lora")
    on_gpu = extract_lora(str(base), str(tuned), tmp_path / "gpu", energy=0.9, embeddings="lora",
                          device="cuda")
    assert [m.rank for m in on_gpu.modules] == [m.rank for m in on_cpu.modules]
    assert on_gpu.total_relative_error == pytest.approx(on_cpu.total_relative_error, rel=1e-3)


def test_peft_merges_exactly_the_written_factors(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """PEFT's merged weights are base + B·A of what was written (scaling 1, no transposes lost)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    base, tuned = pair
    extract_lora(str(base), str(tuned), tmp_path / "a", energy=0.9, max_rank=6, embeddings="lora")
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, tmp_path / "a").merge_and_unload().state_dict()
    weights, base_w = load_file(tmp_path / "a" / "adapter_model.safetensors"), load_weights(base)
    for module in ("model.layers.1.mlp.down_proj", "model.embed_tokens", "lm_head"):
        got = merged[f"{module}.weight"].double() - base_w[f"{module}.weight"].double()
        torch.testing.assert_close(got, _product(weights, module), rtol=0, atol=1e-6)


def test_svd_helpers_against_float64_references() -> None:
    gen = torch.Generator().manual_seed(1)
    delta = torch.randn(300, 8, generator=gen) @ torch.randn(8, 280, generator=gen)
    delta += 0.05 * torch.randn(300, 280, generator=gen)
    s64 = torch.linalg.svdvals(delta.double())
    for method in ("exact", "randomized"):
        u, s, vh = truncated_svd(delta, 16, method=method)
        error = float((delta.double() - (u * s).double() @ vh.double()).norm() / delta.double().norm())
        optimal = float((s64[16:] ** 2).sum().sqrt() / (s64 ** 2).sum().sqrt())
        assert optimal <= error <= optimal * (1.0001 if method == "exact" else 1.01), method
    u, s, vh = randomized_svd(delta, 20, generator=torch.Generator().manual_seed(3))
    assert torch.equal(s, randomized_svd(delta, 20, generator=torch.Generator().manual_seed(3))[1])
    assert energy_rank(torch.tensor([2.0, 1.0, 1.0]), 6.0, 0.8, 3) == 2
    assert energy_rank(torch.tensor([2.0, 1.0, 1.0]), 6.0, 0.8, 1) == 1
    assert energy_rank(torch.tensor([2.0, 1.0, 1.0]), 6.0, 1.0, 3) == 3


def test_short_names_never_widen_the_targets() -> None:
    modules = {"m.0.q", "m.1.q", "m.0.k", "m.1.k", "vision.q"}
    assert short_names(["m.0.q", "m.1.q"], modules) == ["m.0.q", "m.1.q"]  # "q" would match vision.q
    assert short_names(["m.0.k", "m.1.k", "m.0.q"], modules) == ["k", "m.0.q"]


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    return in_process_cli(capsys)


def _mismatched(base: Path, out: Path) -> Path:
    out.mkdir()
    shutil.copy(base / "config.json", out / "config.json")
    weights = load_weights(base)
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(64, 32)
    weights["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(64, 32)
    weights["model.layers.0.mlp.down_proj.weight"] = torch.zeros(32, 64)
    save_file(weights, str(out / "model.safetensors"))
    return out


@pytest.mark.parametrize(("args", "message"), [
    (["--rank", "20"], "--rank 20 is above min(out, in) = 16 of module 'model.layers.0.self_attn.k_proj'"),
    (["--rank", "4", "--energy", "0.9"], "give exactly one of --rank"),
    ([], "give exactly one of --rank"),
    (["--energy", "1.5"], "--energy 1.5: must be above 0 and at most 1"),
    (["--rank", "4", "--max-rank", "8"], "--max-rank 8: goes with --energy"),
    (["--rank", "4", "--max-memory", "10KB"], "above --max-memory"),
    (["--rank", "4", "SAME"], "no module of --model"),
    (["--rank", "4", "MISMATCH"],
     "tensor 'model.layers.0.mlp.down_proj.weight' has shape [32, 64] in --model"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
        cli: Callable[..., tuple[int, str, str]], pair: tuple[Path, Path], tmp_path: Path,
        args: list[str], message: str) -> None:
    base, tuned = pair
    model = tuned
    if "SAME" in args:
        model, args = base, [a for a in args if a != "SAME"]
    if "MISMATCH" in args:
        model, args = _mismatched(base, tmp_path / "bad"), [a for a in args if a != "MISMATCH"]
    code, out, err = cli("lora", "extract", "--base", str(base), "--model", str(model),
                         str(tmp_path / "out"), *args)
    assert code == 2, err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] in ([], ["bad"])


def test_cli_prints_modules_and_total_and_refuses_to_overwrite(
        cli: Callable[..., tuple[int, str, str]], pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    args = ["lora", "extract", "--base", str(base), "--model", str(tuned), str(tmp_path / "a"), "-r", "2"]
    code, out, err = cli(*args, "--json")
    report = json.loads(out)
    assert code == 0 and len(report["modules"]) == 21 and 0 < report["total_relative_error"] < 1
    assert report["not_carried"] == []  # the norms are saved
    code, _, err = cli(*args)
    assert code == 2 and "already exists" in err
    code, out, err = cli(*args, "--overwrite", "--embeddings", "skip", "--norms", "skip")
    assert code == 0 and "total relative error" in out and "model.layers.1.mlp.down_proj" in out
    assert "7 tensor(s) differ but the adapter does not hold them" in err  # 5 norms, 2 embeddings
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None
    card = (tmp_path / "a" / "README.md").read_text()
    assert "library_name: peft" in card and f"base: {base}" in card
    assert "base_model:" not in card  # a local base: only Hub ids may go there


def test_extract_imports_neither_peft_nor_transformers(pair: tuple[Path, Path], tmp_path: Path) -> None:
    base, tuned = pair
    code = ("import sys\nfrom fusekit.cli import main\n"
            f"try:\n    main(['lora', 'extract', '--base', {str(base)!r}, '--model', {str(tuned)!r}, "
            f"{str(tmp_path / 'a')!r}, '--rank', '2', '-q'])\n"
            "except SystemExit as e:\n    assert e.code == 0\n"
            "loaded = [m for m in ('peft', 'transformers') if m in sys.modules]\nassert not loaded, loaded\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "a" / "adapter_model.safetensors").is_file()
