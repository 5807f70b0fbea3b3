"""``fusekit tune``'s evaluation of a candidate and its gradient search.

The in-memory merge is checked against ``fusekit merge``'s files bit for bit, the Evaluator's score
against ``fusekit score`` of the merged folder, and the gradient search's merged weights and their
gradients against the merge kernel and float64 finite differences.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from fusekit import merge
from fusekit.demo import build_demo_models
from fusekit.errors import FusekitError
from fusekit.io.layout import TensorSpec
from fusekit.io.memory_writer import MemoryWriter
from fusekit.plan import build_plan
from fusekit.tune.evaluate import Evaluator, merge_in_memory, parse_candidate, read_texts, recipe_key
from fusekit.tune.gradient import GradientSearch, TermSetup, build_terms, dimension_values
from fusekit.tune.spec import TuneSpec, load_tune_spec
from tests.conftest import in_process_cli, load_weights

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = "def add(a, b):\n    return a + b  # sum\n\nprint(add(2, 3))\n"


def _recipes(models: dict[str, Path]) -> dict[str, dict[str, Any]]:
    base, math_, code = (str(models[n]) for n in ("base", "math", "code"))
    return {
        "linear": {"merge_method": "linear", "models": [
            {"model": math_, "parameters": {"weight": 0.7}}, {"model": code, "parameters": {"weight": 0.4}}]},
        "ties": {"merge_method": "ties", "base_model": base, "models": [
            {"model": math_, "parameters": {"weight": 0.8, "density": 0.4}},
            {"model": code, "parameters": {"weight": 0.5, "density": 0.7}}]},
        "gradient": {"merge_method": "task_arithmetic", "base_model": base, "models": [
            {"model": math_, "parameters": {"weight": [0.2, 0.9, 0.5]}},
            {"model": code, "parameters": {"weight": 0.6}}], "parameters": {"lambda": 0.8}},
        "dare_ties": {"merge_method": "dare_ties", "base_model": base, "random_seed": 5, "models": [
            {"model": math_, "parameters": {"weight": 0.6, "density": 0.5}},
            {"model": code, "parameters": {"weight": 0.9, "density": 0.6}}]},
    }


@pytest.mark.parametrize("name", ["linear", "ties", "gradient", "dare_ties"])
def test_in_memory_merge_equals_merge_on_disk(tiny_models: dict[str, Path], tmp_path: Path,
                                              name: str) -> None:
    recipe = _recipes(tiny_models)[name]
    parsed, text = parse_candidate(recipe, "candidate.yaml")
    state = merge_in_memory(build_plan(parsed, recipe_text=text), seed=5, max_memory=None)
    merge(parsed, tmp_path / "out", random_seed=5 if name == "dare_ties" else None)
    written = load_weights(tmp_path / "out")
    assert sorted(state) == sorted(written)
    for tensor_name, tensor in written.items():
        assert state[tensor_name].dtype == tensor.dtype
        assert torch.equal(state[tensor_name], tensor), tensor_name


def test_in_memory_merge_casts_as_the_merge_does(bf16_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {**_recipes(bf16_models)["ties"], "out_dtype": "float32"}
    parsed, text = parse_candidate(recipe, "candidate.yaml")
    state = merge_in_memory(build_plan(parsed, recipe_text=text), seed=0, max_memory=10**9)
    merge(parsed, tmp_path / "out")
    for tensor_name, tensor in load_weights(tmp_path / "out").items():
        assert state[tensor_name].dtype == torch.float32
        assert torch.equal(state[tensor_name], tensor), tensor_name


def test_memory_writer_refuses_a_tensor_it_did_not_plan() -> None:
    sink = MemoryWriter(Path("."), [TensorSpec("w", (4, 2), torch.float32)])
    sink.write("w", torch.ones(2, 2), first_row=2)
    with pytest.raises(RuntimeError, match="not fully written"):
        sink.finish()
    with pytest.raises(RuntimeError, match="planned"):
        sink.write("w", torch.ones(2, 2, dtype=torch.float16))
    sink.write("w", torch.zeros(2, 2))
    sink.finish()
    assert sink.tensors["w"].tolist() == [[0, 0], [0, 0], [1, 1], [1, 1]]


# -- the Evaluator ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lm_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny models with a tokenizer and tied embeddings (no lm_head tensor); 3 layers, so that the
    middle one sits between the knots of a 2-group gradient."""
    return build_demo_models(tmp_path_factory.mktemp("tune-lm"), hidden_size=32, num_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)


def _spec(folder: Path, recipe: dict[str, Any], *, data: list[str], test: list[str] | None = None,
          **tune: Any) -> TuneSpec:
    """A tune recipe around ``recipe`` (its first weight searched when nothing is)."""
    if "search" not in json.dumps(recipe):
        recipe = json.loads(json.dumps(recipe))
        recipe["models"][0]["parameters"]["weight"] = {"search": [0.1, 1]}
    path = folder / "tune.yaml"
    block = {"data": data, **({"test": test} if test else {}), **tune}
    path.write_text(yaml.safe_dump({**recipe, "tune": block}), encoding="utf-8")
    return load_tune_spec(path)


def _text_file(folder: Path, text: str = TEXT * 4) -> Path:
    path = folder / "data.txt"
    path.write_text(text, encoding="utf-8")
    return path


def test_evaluator_scores_as_fusekit_score(lm_models: dict[str, Path], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    recipe = _recipes(lm_models)["gradient"]
    data = _text_file(tmp_path)
    spec = _spec(tmp_path, recipe, data=[str(data)], test=[str(data)], optimizer="random",
                 budget={"evaluations": 2})
    in_memory = Evaluator(spec, with_test=True)(recipe)
    through_folder = Evaluator(spec, max_memory=1, work_dir=tmp_path / "work")(recipe)
    assert list((tmp_path / "work").iterdir()) == []  # the temporary merge is gone
    merge(parse_candidate(recipe, "c.yaml")[0], tmp_path / "merged")
    code, out, _ = in_process_cli(capsys)("score", str(tmp_path / "merged"), "--text", str(data), "--json")
    assert code == 0
    expected = json.loads(out)[0]["bits_per_byte"]
    assert in_memory.score == pytest.approx(expected, rel=1e-6, abs=0)
    assert in_memory.test_score == in_memory.score
    assert through_folder.score == pytest.approx(expected, rel=1e-6, abs=0)
    assert through_folder.test_score is None
    assert in_memory.key == recipe_key(recipe) and ":" in in_memory.worker


def test_cache_answers_a_repeated_recipe_and_survives_pickling(lm_models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    recipes = _recipes(lm_models)
    spec = _spec(tmp_path, recipes["linear"], data=[str(_text_file(tmp_path))], optimizer="random",
                 budget={"evaluations": 2})
    evaluator = Evaluator(spec)
    first = evaluator(recipes["linear"])
    reordered = dict(reversed(list(recipes["linear"].items())))
    assert evaluator(reordered) is first and evaluator.computed == 1
    other = evaluator(recipes["gradient"])
    assert evaluator.computed == 2 and other.score != first.score
    shipped = pickle.loads(pickle.dumps(evaluator))
    assert shipped(recipes["linear"]) is not first and shipped.computed == 2  # answered from the cache
    fresh = pickle.loads(pickle.dumps(Evaluator(spec)))
    assert fresh(recipes["gradient"]).score == other.score and fresh.computed == 1


def test_jsonl_data_is_every_row_scored_on_its_own(tmp_path: Path) -> None:
    rows = tmp_path / "data.jsonl"
    rows.write_text('{"text": "abc"}\n\n{"prompt": "q", "completion": "de"}\n', encoding="utf-8")
    assert read_texts([str(rows), str(_text_file(tmp_path, "xyz"))]) == ["abc", "de", "xyz"]


# -- gradient search ----------------------------------------------------------------------------------


def _grouped_ties(models: dict[str, Path]) -> dict[str, Any]:
    base, math_, code = (str(models[n]) for n in ("base", "math", "code"))
    return {"merge_method": "ties", "base_model": base, "parameters": {"lambda": {"search": [0.5, 1.5]}},
            "models": [
                {"model": math_, "parameters": {"weight": {"search": [0.1, 1], "groups": 2}, "density": 0.5}},
                {"model": code, "parameters": {"weight": {"search": [0.1, 1], "groups": 2}, "density": 0.8}}]}


def test_functional_weights_match_the_merge_and_finite_differences(lm_models: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    spec = _spec(tmp_path, _grouped_ties(lm_models), data=[str(_text_file(tmp_path))], optimizer="adam",
                 budget={"evaluations": 2}, per_layer=True)
    search = GradientSearch(spec)
    recipe = spec.space.recipe_for(search.start)
    parsed, text = parse_candidate(recipe, "c.yaml")
    plan = build_plan(parsed, recipe_text=text)
    merged = merge_in_memory(plan, seed=0)
    start = dimension_values(spec.space, torch.tensor(search.start, dtype=torch.float64))
    models = [entry["model"] for entry in recipe["models"]]
    terms = build_terms(plan, TermSetup(models, search.knots, start, 0, merged, torch.device("cpu")))
    for term in terms:  # at the start, the functional merge is the merge
        torch.testing.assert_close(term.value(start.float()), merged[term.name], rtol=1e-6, atol=1e-6)
    layer = next(t for t in terms if t.name == "model.layers.1.mlp.up_proj.weight")  # t = 0.5
    for field in ("stack", "base", "agree", "rows", "fixed", "scale_row"):
        setattr(layer, field, getattr(layer, field).double())
    probe = torch.randn(layer.stack.shape[1:], dtype=torch.float64,
                        generator=torch.Generator().manual_seed(0))
    values = (start + torch.tensor([0.05, -0.1, 0.07, 0.02, -0.03], dtype=torch.float64)).requires_grad_()
    (layer.value(values) * probe).sum().backward()
    assert values.grad is not None and values.grad.abs().min() > 0  # every knot and lambda counts here
    eps = 1e-6
    for d in range(len(values)):
        step = torch.zeros_like(values).index_fill(0, torch.tensor(d), eps)
        numeric = ((layer.value(values.detach() + step) - layer.value(values.detach() - step)) * probe).sum()
        assert float(values.grad[d]) == pytest.approx(float(numeric) / (2 * eps), rel=1e-6, abs=1e-9)


@pytest.fixture(scope="module")
def fitted(lm_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base trained for a few steps on TEXT: the model whose weight the data should favour."""
    import shutil

    from fusekit.lm.load import load_lm

    lm = load_lm(lm_models["base"])
    assert lm.tokenizer is not None
    ids = torch.tensor([[lm.tokenizer.bos_token_id, *lm.tokenizer(TEXT * 4)["input_ids"]]])
    model = lm.model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(15):
        optimizer.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
    out = tmp_path_factory.mktemp("fitted") / "fitted"
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(lm_models["base"] / name, out / name)
    return out


def _linear_search(models: dict[str, Path], fitted: Path, folder: Path, evaluations: int) -> TuneSpec:
    recipe = {"merge_method": "linear", "models": [
        {"model": str(fitted), "parameters": {"weight": {"search": [0.01, 1]}}},
        {"model": str(models["code"]), "parameters": {"weight": {"search": [0.01, 1]}}}]}
    return _spec(folder, recipe, data=[str(_text_file(folder))], optimizer="adam",
                 budget={"evaluations": evaluations}, learning_rate=0.3)


def test_adam_moves_toward_the_model_fitted_to_the_data(lm_models: dict[str, Path], fitted: Path,
                                                        tmp_path: Path) -> None:
    search = GradientSearch(_linear_search(lm_models, fitted, tmp_path, 6))
    steps = []
    while not search.done():
        steps.append(search.step())
    assert len(steps) == 6
    (first, first_eval), (last, last_eval) = steps[0], steps[-1]
    assert first == pytest.approx([0.5, 0.5])
    assert last_eval.score < first_eval.score
    assert last[0] > first[0] and last[1] < first[1]  # the fitted model's weight grows, the other's shrinks
    point, best = search.best()
    assert point == last and best.score == pytest.approx(last_eval.score, rel=1e-4)
    assert best.test_score is None  # no test data in this search


def test_state_dict_resumes_the_same_steps(lm_models: dict[str, Path], fitted: Path, tmp_path: Path) -> None:
    spec = _linear_search(lm_models, fitted, tmp_path, 4)
    search = GradientSearch(spec)
    search.step()
    state = pickle.loads(pickle.dumps(search.state_dict()))
    expected = [search.step() for _ in range(2)]
    resumed = GradientSearch(spec)
    resumed.load_state_dict(state)
    got = [resumed.step() for _ in range(2)]
    assert [p for p, _ in got] == [p for p, _ in expected]
    assert [e.score for _, e in got] == pytest.approx([e.score for _, e in expected], rel=1e-9)
    assert resumed.steps == 3 and not resumed.done()
    resumed.step()
    assert resumed.done()


def test_per_layer_needs_grouped_weights(lm_models: dict[str, Path], tmp_path: Path) -> None:
    recipe = {**_grouped_ties(lm_models), "parameters": {}}
    for entry in recipe["models"]:
        entry["parameters"]["weight"] = {"search": [0.1, 1]}
    spec = _spec(tmp_path, recipe, data=[str(_text_file(tmp_path))], optimizer="adam",
                 budget={"evaluations": 2}, per_layer=True)
    with pytest.raises(FusekitError, match="groups: N"):
        GradientSearch(spec)
