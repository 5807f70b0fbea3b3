"""``fusekit select``: greedy forward selection, ΔW cosine similarity from LoRA factors against the
flattened ΔW in float64, average-linkage clustering, the recipes written, and one-line refusals."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import in_process_cli
from peft_helpers import make_peft_adapter
from safetensors.torch import load_file
from test_learned_weights import PROSE, PYTHON, _other_tokenizer, domain_experts

from fusekit.lm import load_lm, score_text
from fusekit.select.cluster import average_linkage, cosine_matrix, delta_gram, representative
from fusekit.select.greedy import greedy_select

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TARGETS = (["q_proj", "v_proj", "embed_tokens"], ["q_proj", "down_proj", "embed_tokens"],
           ["v_proj", "o_proj"])


@dataclass(frozen=True)
class Library:
    base: Path
    adapters: list[Path]
    merged: Path  # adapters[0] merged into the base by PEFT, saved as a full model


@pytest.fixture(scope="module")
def library(tokenizer_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Library:
    import peft
    import transformers

    root = tmp_path_factory.mktemp("select-lora")
    base = tokenizer_models["base"]
    adapters = []
    for seed, targets in enumerate(TARGETS):
        adapters.append(make_peft_adapter(base, root / f"a{seed}", seed=seed, targets=targets))
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, str(adapters[0])).merge_and_unload()
    merged.save_pretrained(root / "merged")
    return Library(base, adapters, root / "merged")


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return domain_experts(tmp_path_factory.getbasetemp() / "select-domain-experts")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEKIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    return in_process_cli(capsys)


def _dense_deltas(adapter: Path) -> dict[str, torch.Tensor]:
    """ΔW = (alpha / r) · B A per module in float64, in the base's layout (embeddings transposed)."""
    config = json.loads((adapter / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = {k: v.double() for k, v in load_file(adapter / "adapter_model.safetensors").items()}
    out = {}
    for name, a in tensors.items():
        if name.endswith(".lora_A.weight"):
            module = name.removesuffix(".lora_A.weight")
            out[module] = tensors[module + ".lora_B.weight"] @ a * scale
        elif name.endswith(".lora_embedding_A"):
            module = name.removesuffix(".lora_embedding_A")
            out[module] = (tensors[module + ".lora_embedding_B"] @ a).T * scale
    return out


def _flat_cosines(deltas: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    names = sorted(set().union(*deltas))
    shapes = {n: next(d[n] for d in deltas if n in d).shape for n in names}
    flat = torch.stack([torch.cat([d.get(n, torch.zeros(shapes[n], dtype=torch.float64)).flatten()
                                   for n in names]) for d in deltas])
    unit = flat / flat.norm(dim=1, keepdim=True)
    return unit @ unit.T


def test_cosine_from_lora_factors_equals_flattened_delta_w(library: Library) -> None:
    gram = delta_gram([str(a) for a in library.adapters])
    expected = _flat_cosines([_dense_deltas(a) for a in library.adapters])
    assert torch.allclose(cosine_matrix(gram), expected, rtol=1e-10, atol=1e-12)
    norms = [sum(float((d ** 2).sum()) for d in _dense_deltas(a).values()) for a in library.adapters]
    assert gram.diagonal().tolist() == pytest.approx(norms, rel=1e-10)


@pytest.mark.parametrize("transposed", [False, True])
def test_inner_product_from_factors_equals_the_dense_one(transposed: bool) -> None:
    from fusekit.select.cluster import LowRank, inner

    g = torch.Generator().manual_seed(3)

    def factors(r: int, scaling: float) -> LowRank:
        a = torch.randn(r, 7, generator=g, dtype=torch.float64)
        return LowRank(a, torch.randn(5, r, generator=g, dtype=torch.float64), scaling, transposed)

    x, y = factors(3, 2.0), factors(2, 0.5)
    dense_x, dense_y = (x.b @ x.a * 2.0), (y.b @ y.a * 0.5)
    if transposed:
        dense_x, dense_y = dense_x.T, dense_y.T
    assert inner(x, y) == pytest.approx(float((dense_x * dense_y).sum()), rel=1e-12)
    other = torch.randn(dense_x.shape, generator=g, dtype=torch.float64)
    assert inner(other, x) == pytest.approx(float((other * dense_x).sum()), rel=1e-12)
    assert inner(x, other) == pytest.approx(float((other * dense_x).sum()), rel=1e-12)


def test_full_model_delta_is_streamed_minus_the_base(library: Library) -> None:
    refs = [str(library.adapters[0]), str(library.merged), str(library.adapters[2])]
    cos = cosine_matrix(delta_gram(refs, base=str(library.base)))
    assert float(cos[0, 1]) == pytest.approx(1.0, abs=1e-5)  # the adapter, merged by PEFT in float32
    base = load_file(library.base / "model.safetensors")
    merged = load_file(library.merged / "model.safetensors")
    full = torch.cat([(merged[n].double() - base[n].double()).flatten() for n in sorted(base)])
    assert float(delta_gram([str(library.merged)], base=str(library.base))[0, 0]) == pytest.approx(
        float(full @ full), rel=1e-10)
    assert float(cos[1, 2]) == pytest.approx(float(cos[0, 2]), abs=1e-5)


def test_average_linkage_differs_from_single_linkage_as_it_should() -> None:
    d = torch.tensor([[0.0, 0.1, 0.3, 0.9], [0.1, 0.0, 0.9, 0.9], [0.3, 0.9, 0.0, 0.5], [0.9, 0.9, 0.5, 0.0]])
    cos = 1.0 - d
    assert average_linkage(cos, 3) == [[0, 1], [2], [3]]
    assert average_linkage(cos, 2) == [[0, 1], [2, 3]]  # single linkage would give [[0, 1, 2], [3]]
    assert average_linkage(cos, 1) == [[0, 1, 2, 3]]
    assert representative(cos, [0, 1, 2]) == 0  # largest summed similarity: 1 + 0.9 + 0.7


def test_greedy_step_one_picks_the_best_single_member(experts: dict[str, Path],
                                                      cli: Callable[..., tuple[int, str, str]],
                                                      tmp_path: Path) -> None:
    refs = [str(experts[n]) for n in ("base", "prose", "python")]
    data = tmp_path / "data.txt"
    data.write_text(PYTHON[:160], encoding="utf-8")
    code, out, err = cli("select", *refs, "--data", str(data), "-k", "2", "-o", str(tmp_path / "r.yaml"),
                         "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    alone = {r: score_text(load_lm(r), PYTHON[:160]).bits_per_byte for r in refs}
    assert report["steps"][0]["added"] == min(alone, key=alone.__getitem__) == refs[2]
    assert report["steps"][0]["tried"] == pytest.approx(alone, rel=1e-9)
    assert report["steps"][1]["bits_per_byte"] == min(report["steps"][1]["tried"].values())
    from fusekit.ensemble.recipe import load_ensemble_recipe

    recipe = load_ensemble_recipe(tmp_path / "r.yaml")[0]
    assert recipe.refs() == report["chosen"] and recipe.method == "prob_avg"
    code, out, err = cli("select", *refs, "--data", str(data), "-k", "1", "-o", str(tmp_path / "t.yaml"),
                         "-q")
    assert code == 0, err
    assert out.splitlines()[1].startswith(f"step 1: add {refs[2]}") and "wrote ensemble recipe" in out


def test_merge_objective_scores_the_merged_subset(experts: dict[str, Path], tmp_path: Path,
                                                   cli: Callable[..., tuple[int, str, str]]) -> None:
    refs = [str(experts["prose"]), str(experts["python"])]
    data = tmp_path / "data.txt"
    data.write_text(PROSE[:90], encoding="utf-8")
    out = tmp_path / "merge.yaml"
    code, stdout, err = cli("select", *refs, "--data", str(data), "-k", "1", "--objective", "merge",
                            "--recipe", "merge", "-o", str(out), "--json", "-q")
    assert code == 0, err
    alone = {r: score_text(load_lm(r), PROSE[:90]).bits_per_byte for r in refs}
    report = json.loads(stdout)
    assert report["steps"][0]["tried"] == pytest.approx(alone, rel=1e-9)  # a merge of one is the model
    from fusekit.recipe.load import load_recipe
    from fusekit.recipe.schema import MergeRecipe

    recipe = load_recipe(out, MergeRecipe)[0]
    assert recipe.merge_method == "linear" and [m.model for m in recipe.models] == [refs[0]]


def test_greedy_adds_the_expert_that_lowers_the_objective_most() -> None:
    calls: list[tuple[int, ...]] = []

    def objective(subset: list[int]) -> float:
        calls.append(tuple(subset))
        return {(2,): 1.0, (2, 0): 0.7, (2, 1): 0.8}.get(tuple(subset), 5.0 - len(subset) * 0.1)

    steps = greedy_select(3, 3, objective)
    assert [s.added for s in steps] == [2, 0, 1] and steps[1].score == 0.7
    assert len(calls) == 3 + 2 + 1


def test_cluster_merge_clusters_writes_one_merged_expert(library: Library, tmp_path: Path,
                                                         cli: Callable[..., tuple[int, str, str]]) -> None:
    data = tmp_path / "data.txt"
    data.write_text(PROSE[:80], encoding="utf-8")
    out = tmp_path / "sel.yaml"
    refs = [str(a) for a in library.adapters]
    code, stdout, err = cli("select", *refs, "--data", str(data), "-k", "1", "--method", "cluster",
                            "--merge-clusters", "--recipe", "merge", "-o", str(out), "--json", "-q")
    assert code == 0, err
    report = json.loads(stdout)
    merged = tmp_path / "sel-experts" / "cluster-1"
    assert report["clusters"] == [refs] and report["members"] == [str(merged)]
    base = load_file(library.base / "model.safetensors")
    got = load_file(merged / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    mean = sum(_dense_deltas(a).get(f"base_model.model.{name.removesuffix('.weight')}", 0.0)
               for a in library.adapters) / 3
    assert torch.allclose(got[name].double(), base[name].double() + mean, atol=1e-5)
    assert "merge_method: linear" in out.read_text()
    assert math.isfinite(report["bits_per_byte"])


@pytest.mark.parametrize("problem", ["k too large", "k zero", "empty data", "tokenizers"])
def test_select_bad_input_exits_2_with_one_line(problem: str, experts: dict[str, Path], tmp_path: Path,
                                                cli: Callable[..., tuple[int, str, str]]) -> None:
    refs = [str(experts["python"]), str(experts["prose"])]
    if problem == "tokenizers":
        refs.append(str(_other_tokenizer(experts["prose"], tmp_path / "other")))
    data = tmp_path / "data.txt"
    data.write_text("" if problem == "empty data" else PYTHON[:50], encoding="utf-8")
    k = {"k too large": "3", "k zero": "0"}.get(problem, "1")
    out = tmp_path / "sel.yaml"
    code, stdout, err = cli("select", *refs, "--data", str(data), "-k", k, "-o", str(out), "-q")
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1, err
    expected = {"k too large": "-k 3", "k zero": "-k 0", "empty data": "empty", "tokenizers": refs[-1]}
    assert expected[problem] in err
    assert not out.exists()
