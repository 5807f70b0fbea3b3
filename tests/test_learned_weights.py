"""Learned ensemble weights: per-token log-probabilities windowed as ``fusekit score`` windows them,
mixture bits per byte against float64 references, the optimiser against a brute-force grid, and
``fusekit ensemble learn-weights`` end to end (its recipe scores as the mixture says).

Two tiny experts are trained in the test, a few Adam steps each from one base on one domain's text,
so that each fits its own domain clearly better than the other does.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import in_process_cli

from fusekit.demo import build_demo_models
from fusekit.lm import load_lm
from fusekit.select.mixture import TokenLogprobs, learn_weights, member_token_logprobs, mixture_bpb

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PYTHON = "def add(a, b):\n    return a + b\n\nfor i in range(10):\n    print(add(i, i))\n" * 3
PROSE = "The river ran slowly past the old mill, and the children watched the boats go by.\n" * 3
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def _train(base: Path, out: Path, text: str, *, steps: int = 25) -> Path:
    import transformers

    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(base)
    ids = torch.tensor([[tok.bos_token_id, *tok(text, add_special_tokens=False)["input_ids"]][:128]])
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        optimiser.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimiser.step()
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy(base / name, out / name)
    return out


def domain_experts(root: Path) -> dict[str, Path]:
    """``base``, ``python`` and ``prose`` (trained on PYTHON / PROSE), built once under ``root``."""
    folders = {"base": root / "base", "python": root / "python", "prose": root / "prose"}
    if not (folders["prose"] / "config.json").is_file():
        build_demo_models(root, names=("base",), hidden_size=32, num_layers=2, num_attention_heads=4,
                          num_key_value_heads=2)
        _train(folders["base"], folders["python"], PYTHON)
        _train(folders["base"], folders["prose"], PROSE)
    return folders


@pytest.fixture(scope="module")
def experts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return domain_experts(tmp_path_factory.getbasetemp() / "select-domain-experts")


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSEKIT_SCORE_CACHE", raising=False)


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    return in_process_cli(capsys)


def _reference_bpb(lp: torch.Tensor, weights: list[float], n_bytes: int) -> float:
    """``-Σ_t log Σ_i w_i p_i(t) / ln 2 / n_bytes`` term by term in float64."""
    total = 0.0
    for t in range(lp.shape[1]):
        total -= math.log(sum(w * math.exp(float(lp[i, t])) for i, w in enumerate(weights)))
    return total / math.log(2) / n_bytes


@pytest.mark.parametrize("context", [None, 16])
def test_one_hot_mixture_equals_fusekit_score(experts: dict[str, Path], tmp_path: Path, context: int | None,
                                              cli: Callable[..., tuple[int, str, str]]) -> None:
    text = PYTHON + PROSE  # with context 16: many sliding windows
    refs = [str(experts["python"]), str(experts["prose"])]
    lp = member_token_logprobs(refs, [text], context=context)
    assert lp.logprobs.dtype == torch.float64 and lp.n_bytes == len(text.encode())
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    extra = ["--context", str(context)] if context else []
    code, out, _ = cli("score", *refs, "--text", str(path), "--json", "-q", *extra)
    assert code == 0
    for i, row in enumerate(json.loads(out)):
        one_hot = [1.0 if j == i else 0.0 for j in range(2)]
        assert mixture_bpb(lp, one_hot) == pytest.approx(row["bits_per_byte"], rel=1e-9)
        assert lp.logprobs.shape[1] == row["n_tokens"]


def test_cached_token_logprobs_equal_fresh_ones(experts: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import fusekit.select.mixture as mixture

    refs = [str(experts["python"])]
    first = member_token_logprobs(refs, [PYTHON, PROSE])
    monkeypatch.setattr(mixture, "_score_now", lambda *a, **k: pytest.fail("scored again"))
    again = member_token_logprobs(refs, [PROSE, PYTHON])
    assert again.logprobs.shape == first.logprobs.shape
    split = len(load_lm(experts["python"]).tokenizer(PYTHON, add_special_tokens=False)["input_ids"])
    assert torch.equal(again.logprobs[0, -split:], first.logprobs[0, :split])


def test_mixture_bpb_matches_a_float64_reference() -> None:
    g = torch.Generator().manual_seed(1)
    lp = torch.log(torch.rand(3, 50, generator=g, dtype=torch.float64))
    weights = [0.2, 0.5, 0.3]
    assert mixture_bpb(TokenLogprobs(lp, 77), weights) == pytest.approx(_reference_bpb(lp, weights, 77),
                                                                        rel=1e-12)
    assert mixture_bpb(TokenLogprobs(lp, 77), [2, 5, 3]) == pytest.approx(_reference_bpb(lp, weights, 77),
                                                                          rel=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_learned_weights_match_a_brute_force_grid(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    p = torch.rand(2, 300, generator=g, dtype=torch.float64) * torch.tensor([[1.0], [0.6 + 0.2 * seed]],
                                                                            dtype=torch.float64)
    lp = TokenLogprobs(torch.log(p.clamp_min(1e-6)), 400)
    learned = learn_weights(lp)
    coarse, _ = _grid_min(lp.logprobs, torch.linspace(0, 1, 1001, dtype=torch.float64))
    fine = torch.linspace(max(0.0, coarse - 1e-3), min(1.0, coarse + 1e-3), 2001, dtype=torch.float64)
    best, value = _grid_min(lp.logprobs, fine)  # a step of 1e-6 around the coarse grid's minimum
    assert learned[0] == pytest.approx(best, abs=1e-5)
    assert mixture_bpb(lp, learned) <= value / math.log(2) / 400 + 1e-12


def _grid_min(lp: torch.Tensor, grid: torch.Tensor) -> tuple[float, float]:
    """The grid point ``w`` (weight of member 0) with the lowest ``-Σ_t log(w p_0 + (1-w) p_1)``."""
    w = grid[:, None]  # log(0) = -inf at the ends is exact: logaddexp keeps the other member
    values = -torch.logaddexp(lp[0] + w.log(), lp[1] + (1 - w).log()).sum(dim=1)
    best = int(values.argmin())
    return float(grid[best]), float(values[best])


def test_learned_weights_never_lose_to_uniform_or_any_single_member() -> None:
    g = torch.Generator().manual_seed(7)
    lp = TokenLogprobs(torch.log(torch.rand(5, 400, generator=g, dtype=torch.float64) ** 2), 500)
    learned = learn_weights(lp)
    assert sum(learned) == pytest.approx(1.0) and min(learned) >= 0
    best = mixture_bpb(lp, learned)
    assert best <= mixture_bpb(lp, [1.0] * 5) + 1e-12
    for i in range(5):
        assert best <= mixture_bpb(lp, [1.0 if j == i else 0.0 for j in range(5)]) + 1e-12
    near = [w + 0.01 for w in learned]  # any other point of the simplex is no better
    assert best <= mixture_bpb(lp, near) + 1e-12


def test_weights_learned_on_one_domain_favour_its_expert(experts: dict[str, Path]) -> None:
    refs = [str(experts["prose"]), str(experts["python"])]
    on_python = learn_weights(member_token_logprobs(refs, [PYTHON[:150], PYTHON[40:200]]))
    on_prose = learn_weights(member_token_logprobs(refs, [PROSE[:120]]))
    assert on_python[1] > 0.8 and on_prose[0] > 0.8


def test_learn_weights_cli_writes_a_recipe_that_scores_as_the_mixture(
        experts: dict[str, Path], tmp_path: Path, cli: Callable[..., tuple[int, str, str]]) -> None:
    from fusekit.ensemble.engine import load_ensemble
    from fusekit.ensemble.recipe import load_ensemble_recipe
    from fusekit.ensemble.scoring import score_ensemble

    recipe = tmp_path / "ens.yaml"
    recipe.write_text(f"models:\n  - model: {experts['prose']}\n  - model: {experts['python']}\n"
                      "method: prob_avg\n", encoding="utf-8")
    data = tmp_path / "data.jsonl"
    rows = (PYTHON[:120], PROSE[:60])
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows), encoding="utf-8")
    code, out, err = cli("ensemble", "learn-weights", str(recipe), "--data", str(data), "--json", "-q")
    assert code == 0, err
    report = json.loads(out)
    written = tmp_path / "ens.learned.yaml"
    assert report["recipe"] == str(written) and recipe.read_text().startswith("models:")
    assert report["bits_per_byte_after"] <= report["bits_per_byte_before"]
    weights = [m["after"] for m in report["members"]]
    assert load_ensemble_recipe(written)[0].weights() == pytest.approx(weights, rel=1e-12)
    text = PYTHON[:120]
    lp = member_token_logprobs([str(experts["prose"]), str(experts["python"])], [text])
    ens = score_ensemble(load_ensemble(written), text, members=False).ensemble
    assert ens.bits_per_byte == pytest.approx(mixture_bpb(lp, weights), rel=1e-6)


def _other_tokenizer(model: Path, out: Path) -> Path:
    shutil.copytree(model, out)
    spec = json.loads((out / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    a, b = sorted(k for k in vocab if len(k) == 1 and k.isalpha())[:2]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(spec), encoding="utf-8")
    return out


@pytest.mark.parametrize("problem", ["logit_avg", "tokenizers", "empty data"])
def test_learn_weights_bad_input_exits_2_with_one_line(problem: str, experts: dict[str, Path], tmp_path: Path,
                                                       cli: Callable[..., tuple[int, str, str]]) -> None:
    second = experts["python"]
    if problem == "tokenizers":
        second = _other_tokenizer(experts["python"], tmp_path / "other")
    method = "logit_avg" if problem == "logit_avg" else "prob_avg"
    recipe = tmp_path / "ens.yaml"
    recipe.write_text(f"models:\n  - model: {experts['prose']}\n  - model: {second}\nmethod: {method}\n",
                      encoding="utf-8")
    data = tmp_path / "data.txt"
    data.write_text("" if problem == "empty data" else PYTHON, encoding="utf-8")
    code, out, err = cli("ensemble", "learn-weights", str(recipe), "--data", str(data), "-q")
    assert code == 2 and out == ""
    assert len(err.strip().splitlines()) == 1, err
    assert {"logit_avg": "prob_avg", "tokenizers": str(second), "empty data": "empty"}[problem] in err
    assert not (tmp_path / "ens.learned.yaml").exists()
