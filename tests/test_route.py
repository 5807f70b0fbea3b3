"""Routing library: recipe, data, features, routers, policy, build/save/load, evaluation.

Tiny random Llama models (``fusekit.demo``, byte-level tokenizer) stand in for experts; routers are
checked against float64 references computed here and against invariants with hypothesis.
"""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fusekit.demo import build_demo_models
from fusekit.errors import FusekitError, RecipeError
from fusekit.route import build_router, evaluate_router, load_examples, load_router, run_router
from fusekit.route.build import fold_groups, fold_indices
from fusekit.route.data import Example, RouteDataError
from fusekit.route.features import Embedding, FeatureError, Hidden, Tfidf, _mean_pool, _NgramTrie
from fusekit.route.fitted import fit_router
from fusekit.route.labels import LabelError, Scores, loss_labels, score_matrix
from fusekit.route.policy import calibrate, choose, choose_one, cost_order, dear_share_tail, tails
from fusekit.route.recipe import KnnRouter, LogisticRouter, MfRouter, MlpRouter, parse_route_recipe
from fusekit.route.router import RouterFolderError

ROUTERS = [KnnRouter(type="knn"), LogisticRouter(type="logistic", epochs=150),
           MlpRouter(type="mlp", epochs=150), MfRouter(type="mf", epochs=150)]

_PY = ["def {w}(x):\n    return x + {n}\n", "import {w}\nfor i in range({n}):\n    print(i)\n",
       "class {W}:\n    def __init__(self):\n        self.{w} = {n}\n"]
_C = ["int {w}(int x) {{ return x * {n}; }}\n", "#include <{w}.h>\nstatic char buf[{n}];\n",
      "for (int i = 0; i < {n}; i++) {{ {w}[i] = 0; }}\n"]
_EN = ["The {w} walked along the river for {n} miles before resting.\n",
       "Permission is granted to anyone who reads the {w} notice, within {n} days.\n",
       "She wrote that the {w} was quiet and the garden smelled of rain.\n"]
_WORDS = ["alpha", "beta", "gamma", "delta", "omega", "kappa", "sigma", "theta", "lambda", "zeta"]


def synthetic(n_per: int, seed: int) -> list[tuple[str, int]]:
    """(text, domain index) pairs from three easily told-apart domains."""
    rng = random.Random(seed)
    out = []
    for domain, templates in enumerate((_PY, _C, _EN)):
        for _ in range(n_per):
            w = rng.choice(_WORDS)
            out.append((rng.choice(templates).format(w=w, W=w.title(), n=rng.randint(1, 999)), domain))
    rng.shuffle(out)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_models(tmp_path_factory.mktemp("route-models"), names=("prose", "c", "python"),
                             hidden_size=32, num_layers=2, num_attention_heads=4, num_key_value_heads=2)


def write_data(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def recipe_text(models: dict[str, Path], data: Path, extra: str = "") -> str:
    return (f"models:\n  - model: {models['prose']}\n    cost: 1\n  - model: {models['c']}\n    cost: 2\n"
            f"  - model: {models['python']}\n    cost: 4\ndata: {data}\n{extra}")


# --- recipe and data -------------------------------------------------------------------------------


def test_recipe_defaults_and_shorthands() -> None:
    recipe, _ = parse_route_recipe("models:\n  - model: a/x\n  - model: ./y\n    cost: 3\ndata: d.jsonl\n"
                                   "router: mf\ncalibrate: 0.3\n")
    assert recipe.names == ["x", "y"]
    assert recipe.labels.method == "loss" and recipe.features.type == "tfidf"
    assert recipe.router.type == "mf" and recipe.calibrate is not None and recipe.calibrate.share == 0.3
    assert recipe.folds == 5 and recipe.fold_block == 25 and recipe.models[0].cost == 1.0
    recipe, _ = parse_route_recipe("models:\n  - model: a\n  - model: b\n    cost: 2\ndata: d\nfolds: 0\n"
                                   "calibrate: {share: 0.2, data: q.jsonl}\n")
    assert recipe.calibrate is not None and recipe.calibrate.data == "q.jsonl"


@pytest.mark.parametrize(("text", "message"), [
    ("models:\n  - model: a\n    cost: -1\ndata: d\n",
     "r.yaml:3:5 models[0].cost: must be a finite number >= 0"),
    ("models:\n  - model: a\ndata: d\nrouter: {type: knn, kk: 3}\n", "did you mean 'k'?"),
    ("models:\n  - model: a\n  - model: b\n  - model: c\ndata: d\nlabels: pairwise\n",
     "pairwise labels compare exactly two models"),
    ("models:\n  - model: a\n  - model: b\ndata: d\ncalibrate: 0.5\n", "every model has the same cost"),
    ("models:\n  - model: x/a\n  - model: y/a\ndata: d\n", "two models are called 'a'"),
    ("models:\n  - model: a\n  - model: b\n    cost: 2\ndata: d\nfolds: 0\ncalibrate: 0.5\n",
     "or queries to calibrate on as calibrate.data"),
    ("models:\n  - model: a\ndata: d\nfold_block: 0\n", "fold_block"),
    ("models:\n  - model: a\ndata: d\nfeatures: {type: hidden}\n", "required key 'model' is missing"),
])
def test_recipe_errors_are_one_line(text: str, message: str) -> None:
    with pytest.raises(RecipeError) as info:
        parse_route_recipe(text, "r.yaml")
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(("content", "message"), [
    ("", "holds no examples"),
    ('{"text": "a"}\n{"text": "b"\n', "d.jsonl:2: not valid JSON"),
    ('{"text": "a"}\n\n["x"]\n', "d.jsonl:3: expected a JSON object"),
    ('{"prompt": "a"}\n', "d.jsonl:1: needs 'text'"),
    ('{"text": "  "}\n', "d.jsonl:1: the text is empty"),
    ('{"text": "a", "label": "gpt"}\n', "d.jsonl:1: label 'gpt' is not one of the router's models"),
])
def test_data_errors_name_the_line(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(RouteDataError) as info:
        load_examples(path, models=["a", "b"])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_data_rows(tmp_path: Path) -> None:
    path = write_data(tmp_path / "d.jsonl", [{"text": "x", "domain": "c"},
                                            {"prompt": "p", "completion": "q", "label": "a"}])
    first, second = load_examples(path, models=["a"])
    assert (first.query, first.scored_text, first.extra) == ("x", "x", {"domain": "c"})
    assert (second.query, second.scored_text, second.label, second.line) == ("p", "q", "a", 2)


# --- features --------------------------------------------------------------------------------------


def test_tfidf_matches_float64_reference() -> None:
    docs = ["abab", "abc", "cab a"]
    tfidf = Tfidf((1, 2), max_features=5)
    tfidf.fit(docs)
    grams = [Counter(d[i:i + n] for n in (1, 2) for i in range(len(d) - n + 1)) for d in docs]
    df = Counter(g for c in grams for g in c)
    vocab = sorted(df, key=lambda g: (-df[g], g))[:5]
    assert list(tfidf.vocabulary) == vocab
    query = "abca"
    counts = Counter(query[i:i + n] for n in (1, 2) for i in range(len(query) - n + 1))
    ref = [(1 + math.log(counts[g])) * (math.log(4 / (1 + df[g])) + 1) if counts[g] else 0.0 for g in vocab]
    norm = math.sqrt(sum(v * v for v in ref))
    got = tfidf.transform([query])[0].double()
    assert torch.allclose(got, torch.tensor(ref, dtype=torch.float64) / norm, atol=1e-6)


def _plain_tfidf(tfidf: Tfidf, query: str) -> torch.Tensor:
    """float64 reference from the definition: Python n-gram counts, 1 + ln(count), idf, unit length."""
    out = torch.zeros(len(tfidf.vocabulary), dtype=torch.float64)
    for gram, count in tfidf.grams(query).items():
        if gram in tfidf.vocabulary:
            column = tfidf.vocabulary[gram]
            out[column] = (1 + math.log(count)) * float(tfidf.idf[column])
    norm = out.norm()
    return out / norm if norm > 0 else out


_ALPHABET = st.sampled_from(list("abcab  \n{}();xyzÄéİß") + ["\u4e2d", "\U0001F600", "\u0307"])


@settings(max_examples=40, deadline=None)
@given(docs=st.lists(st.text(_ALPHABET, max_size=30), min_size=1, max_size=6),
       queries=st.lists(st.text(_ALPHABET, max_size=40), min_size=1, max_size=4),
       low=st.integers(1, 3), span=st.integers(0, 3), max_features=st.integers(2, 60),
       lowercase=st.booleans())
def test_tfidf_fast_path_equals_the_definition(docs: list[str], queries: list[str], low: int, span: int,
                                               max_features: int, lowercase: bool) -> None:
    tfidf = Tfidf((low, low + span), max_features=max_features, lowercase=lowercase)
    tfidf.fit(docs)
    got = tfidf.transform(queries).double()
    assert torch.allclose(tfidf.sparse_rows(queries).to_dense().double(), got, atol=1e-6)
    for row, query in enumerate(queries):
        assert torch.allclose(got[row], _plain_tfidf(tfidf, query), atol=1e-6)
        counts = tfidf.grams(query)
        assert tfidf.counts(query).tolist() == [counts[g] for g in tfidf.vocabulary]


def test_tfidf_falls_back_when_the_trie_table_is_too_big(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_NgramTrie, "MAX_ENTRIES", 100)
    docs = ["".join(chr(0x100 + (i * 7 + j) % 600) for j in range(40)) for i in range(30)]
    tfidf = Tfidf((1, 8), max_features=3000)
    tfidf.fit(docs)
    query = docs[3][5:30] + "q"
    assert tfidf._trie is None
    assert torch.allclose(tfidf.transform([query])[0].double(), _plain_tfidf(tfidf, query), atol=1e-6)
    assert torch.allclose(tfidf.sparse_rows([query]).to_dense()[0].double(), _plain_tfidf(tfidf, query),
                          atol=1e-6)
    assert tfidf._trie is not None and not tfidf._trie.usable


def test_mean_pool_ignores_padding() -> None:
    states = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    pooled = _mean_pool(states, mask)
    assert torch.allclose(pooled[0], states[0, :2].mean(0)) and torch.allclose(pooled[1], states[1].mean(0))


def test_hidden_features_match_manual_pooling(models: dict[str, Path]) -> None:
    from fusekit.lm import load_lm

    texts = ["def f(x): return x", "int main(void) { return 0; }", "hello"]
    feats = Hidden(str(models["python"]), layer=1, batch_size=2)
    feats.fit(texts)
    lm = load_lm(models["python"])
    assert lm.tokenizer is not None
    rows = []
    for text in texts:  # one at a time: no padding at all
        ids = torch.tensor([lm.tokenizer(text)["input_ids"]])
        with torch.inference_mode():
            states = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        rows.append(states[0].double().mean(0))
    raw = torch.stack(rows)
    ref = (raw - raw.mean(0)) / raw.std(0, unbiased=False)
    assert torch.allclose(feats.transform(texts).double(), ref, atol=1e-4)


@pytest.fixture(scope="module")
def encoder(models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT encoder folder with the demo byte-level tokenizer (a sentence-transformers root)."""
    import shutil

    from transformers import BertConfig, BertModel

    folder = tmp_path_factory.mktemp("encoder")
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128)).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (models["prose"] / name).is_file():
            shutil.copy(models["prose"] / name, folder / name)
    (folder / "modules.json").write_text("[]", encoding="utf-8")
    return folder


def test_embedding_features_match_manual_pooling(encoder: Path) -> None:
    from transformers import AutoModel, AutoTokenizer

    texts = ["the quick brown fox", "int x = 1;", "a"]
    feats = Embedding(str(encoder), batch_size=2)
    feats.fit(texts)
    model, tok = AutoModel.from_pretrained(encoder).eval(), AutoTokenizer.from_pretrained(encoder)
    rows = []
    for text in texts:
        ids = torch.tensor([tok(text)["input_ids"]])
        with torch.inference_mode():
            pooled = model(input_ids=ids).last_hidden_state[0].double().mean(0)
        rows.append(pooled / pooled.norm())
    raw = torch.stack(rows)
    ref = (raw - raw.mean(0)) / raw.std(0, unbiased=False).clamp_min(1e-6)
    assert torch.allclose(feats.transform(texts).double(), ref, atol=1e-4)


def test_embedding_model_missing(tmp_path: Path) -> None:
    feats = Embedding(str(tmp_path / "nope"))
    with pytest.raises(FeatureError, match="features.model"):
        feats.fit(["a"])


# --- routers and policy ----------------------------------------------------------------------------


def _split_features() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    train, test = synthetic(20, seed=1), synthetic(10, seed=2)
    tfidf = Tfidf((1, 3), max_features=512)
    tfidf.fit([t for t, _ in train])
    return (tfidf.transform([t for t, _ in train]), torch.tensor([d for _, d in train]),
            tfidf.transform([t for t, _ in test]), torch.tensor([d for _, d in test]))


@pytest.mark.parametrize("spec", ROUTERS, ids=lambda s: s.type)
def test_router_learns_separable_domains(spec: KnnRouter | LogisticRouter | MlpRouter | MfRouter) -> None:
    x, y, x_test, y_test = _split_features()
    fitted = fit_router(spec, x, y, 3, seed=0)
    q = fitted.probabilities(x_test)
    assert torch.allclose(q.sum(1), torch.ones(len(q)), atol=1e-5)
    assert (q.argmax(1) == y_test).double().mean() >= 0.9
    again = fit_router(spec, x, y, 3, seed=0)
    assert all(torch.equal(fitted.params[k], again.params[k]) for k in fitted.params)  # same seed


def test_knn_matches_float64_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x, q = torch.randn(12, 5, generator=gen), torch.randn(3, 5, generator=gen)
    y = torch.tensor([0, 1, 2] * 3 + [0, 0, 1])
    fitted = fit_router(KnnRouter(type="knn", k=2, temperature=0.2), x, y, 4)
    xn = x.double() / x.double().norm(dim=1, keepdim=True)
    qn = q.double() / q.double().norm(dim=1, keepdim=True)
    sims = qn @ xn.T
    scores = torch.stack([sims[:, y == m].topk(2, dim=1).values.mean(1) if (y == m).any()
                          else torch.full((3,), -math.inf, dtype=torch.float64) for m in range(4)], 1)
    assert torch.allclose(fitted.probabilities(q).double(), torch.softmax(scores / 0.2, 1), atol=1e-5)


@pytest.mark.parametrize("sparse", [True, False], ids=["sparse-rows", "dense-rows"])
def test_knn_with_every_model_holding_k_wins_matches_float64_reference(sparse: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    x, q = torch.randn(30, 40, generator=gen), torch.randn(4, 40, generator=gen)
    if sparse:  # mostly zero rows, as tfidf gives: the sparse product path
        x, q = x * (torch.rand(30, 40, generator=gen) < 0.1), q * (torch.rand(4, 40, generator=gen) < 0.1)
        q[:, 0] = 1.0
    y = torch.tensor([0] * 12 + [1] * 5 + [2] * 13)[torch.randperm(30, generator=gen)]
    fitted = fit_router(KnnRouter(type="knn", k=4, temperature=0.1), x, y, 3)
    xn = x.double() / x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
    qn = q.double() / q.double().norm(dim=1, keepdim=True)
    sims = qn @ xn.T
    scores = torch.stack([sims[:, y == m].topk(4, dim=1).values.mean(1) for m in range(3)], 1)
    assert torch.allclose(fitted.probabilities(q).double(), torch.softmax(scores / 0.1, 1), atol=1e-5)


def test_knn_takes_sparse_tfidf_rows() -> None:
    train, test = synthetic(8, seed=4), synthetic(3, seed=5)
    tfidf = Tfidf((1, 3), max_features=300)
    tfidf.fit([t for t, _ in train])
    fitted = fit_router(KnnRouter(type="knn", k=3), tfidf.transform([t for t, _ in train]),
                        torch.tensor([d for _, d in train]), 3)
    queries = [t for t, _ in test]
    dense = fitted.probabilities(tfidf.transform(queries))
    assert torch.allclose(fitted.probabilities(tfidf.sparse_rows(queries)), dense, atol=1e-6)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(st.floats(0, 1), min_size=1, max_size=5).filter(lambda r: sum(r) > 1e-3),
       seed=st.integers(0, 1000), threshold=st.one_of(st.just(0.0), st.just(1.0), st.floats(0, 1)))
def test_choose_one_agrees_with_choose(rows: list[float], seed: int, threshold: float) -> None:
    q = torch.tensor([rows])
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    assert choose_one(q[0].tolist(), order, threshold) == int(choose(q, order, threshold)[0])


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(ROUTERS), label=st.integers(0, 2), seed=st.integers(0, 100))
def test_router_trained_on_one_label_picks_it(kind: KnnRouter | LogisticRouter | MlpRouter | MfRouter,
                                              label: int, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(10, 6, generator=gen)
    fitted = fit_router(kind.model_copy(update={"epochs": 60} if kind.type != "knn" else {}), x,
                        torch.full((10,), label), 3, seed=seed)
    q = fitted.probabilities(torch.randn(7, 6, generator=gen))
    assert (choose(q, [0, 1, 2], 0.5) == label).all()


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(ROUTERS), seed=st.integers(0, 100), threshold=st.floats(0, 1))
def test_router_over_one_model_always_picks_it(kind: KnnRouter | LogisticRouter | MlpRouter | MfRouter,
                                               seed: int, threshold: float) -> None:
    x = torch.randn(6, 4, generator=torch.Generator().manual_seed(seed))
    fitted = fit_router(kind, x, torch.zeros(6), 1, seed=seed)
    assert (choose(fitted.probabilities(x), [0], threshold) == 0).all()


prob_rows = st.integers(2, 5).flatmap(lambda n: st.lists(
    st.lists(st.floats(0, 1), min_size=n, max_size=n).filter(lambda r: sum(r) > 1e-3),
    min_size=1, max_size=20))


@settings(max_examples=60, deadline=None)
@given(rows=prob_rows, costs=st.data())
def test_threshold_extremes_send_everything_to_cheapest_and_dearest(rows: list[list[float]],
                                                                    costs: st.DataObject) -> None:
    q = torch.tensor(rows)
    q = q / q.sum(1, keepdim=True)
    n = q.shape[1]
    cost = costs.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    strength = costs.draw(st.lists(st.floats(0, 1), min_size=n, max_size=n))
    order = cost_order(cost, strength)
    assert (choose(q, order, 1.0) == order[0]).all()
    assert (choose(q, order, 0.0) == order[-1]).all()
    assert min(cost) == cost[order[0]] and max(cost) == cost[order[-1]]
    previous = n
    for t in torch.linspace(0, 1, 11).tolist():  # a higher threshold never moves a query to a dearer model
        position = torch.tensor([order.index(int(m)) for m in choose(q, order, t)])
        assert int(position.max()) <= previous
        previous = int(position.max())


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.floats(1e-5, 1 - 1e-5), min_size=1, max_size=50, unique=True),
       share=st.floats(0, 1))
def test_calibration_hits_the_share_on_its_own_data(values: list[float], share: float) -> None:
    tail = torch.tensor(values, dtype=torch.float64)
    t = calibrate(tail, share)
    assert float((tail > t).double().mean()) == pytest.approx(round(share * len(values)) / len(values))


def test_tails_and_dear_share_tail_agree_with_choose() -> None:
    q = torch.softmax(torch.randn(50, 4, generator=torch.Generator().manual_seed(3)), 1)
    order, n_cheap = [2, 0, 1, 3], 2
    tail = tails(q, order)
    assert torch.allclose(tail[:, 0], 1 - q[:, 2].double(), atol=1e-5)
    value = dear_share_tail(q, order, n_cheap)
    for t in (0.1, 0.4, 0.8):
        dear = torch.isin(choose(q, order, t), torch.tensor([1, 3]))
        assert torch.equal(dear, value > t)


def _rows(n: int, groups: list[str] | None = None) -> list[Example]:
    return [Example(f"q{i}", None, None, i + 1, {} if groups is None else {"group": groups[i]})
            for i in range(n)]


@given(st.integers(4, 300), st.integers(2, 6), st.integers(1, 40), st.integers(0, 9))
@settings(max_examples=60, deadline=None)
def test_folds_partition_the_data_and_keep_runs_of_lines_together(n: int, folds: int, block: int,
                                                                  seed: int) -> None:
    if n < folds:
        with pytest.raises(LabelError, match="lower 'folds'"):
            fold_indices(fold_groups(_rows(n), block, folds), folds, seed)
        return
    groups = fold_groups(_rows(n), block, folds)
    parts = fold_indices(groups, folds, seed)
    assert sorted(i for part in parts for i in part) == list(range(n))
    assert all(part for part in parts)
    run = max(1, min(block, n // (2 * folds)))  # the data is cut in runs of this many lines
    fold_of = {i: f for f, part in enumerate(parts) for i in part}
    assert all(fold_of[i] == fold_of[i - i % run] for i in range(n))
    assert parts == fold_indices(groups, folds, seed)


def test_folds_keep_each_data_group_in_one_fold() -> None:
    rng = random.Random(3)
    labels = [rng.choice("abcdefgh") for _ in range(200)]  # interleaved, unlike runs of lines
    parts = fold_indices(fold_groups(_rows(200, labels), 25, 4), 4, 0)
    for part in parts:
        inside = {labels[i] for i in part}
        outside = {labels[i] for other in parts if other is not part for i in other}
        assert not inside & outside
    with pytest.raises(LabelError, match="more than the 2 groups"):
        fold_indices(fold_groups(_rows(10, ["x", "y"] * 5), 25, 3), 3, 0)


def test_loss_labels_break_ties_towards_the_cheaper_model() -> None:
    scores = Scores(torch.tensor([[3.0, 2.0, 2.0], [1.0, 4.0, 5.0]], dtype=torch.float64),
                    torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert loss_labels(scores, [2, 1, 0]).tolist() == [2, 0]
    assert loss_labels(scores, [0, 1, 2]).tolist() == [1, 0]


# --- build, save, load, run, evaluate --------------------------------------------------------------


def _given_data(tmp_path: Path, n_per: int = 8, seed: int = 0) -> Path:
    names = ["python", "c", "prose"]
    return write_data(tmp_path / "train.jsonl", [{"text": t, "label": names[d], "domain": names[d]}
                                                for t, d in synthetic(n_per, seed)])


def test_build_save_load_run_roundtrip(models: dict[str, Path], tmp_path: Path) -> None:
    data = _given_data(tmp_path)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(models, data, "labels: given\nrouter: logistic\ncalibrate: 0.6667\n"
                                  "folds: 4\n"), encoding="utf-8")
    result = build_router(recipe, tmp_path / "router")
    assert sorted(p.name for p in (tmp_path / "router").iterdir()) == [
        "README.md", "route.yaml", "router.json", "router.safetensors"]
    card = (tmp_path / "router" / "README.md").read_text(encoding="utf-8")
    assert all(f"`{name}`" in card for name in ("prose", "c", "python"))
    loaded = load_router(tmp_path / "router")
    queries = ["def g(y):\n    return y\n", "static int z[3];", "It rained on the meadow."]
    assert torch.allclose(loaded.probabilities(queries), result.router.probabilities(queries))
    assert loaded.threshold == result.router.threshold
    assert float((loaded.calibration_tail > loaded.threshold).double().mean()) == pytest.approx(16 / 24)
    assert result.router.info["training"]["heldout_accuracy"] >= 0.9
    decision = run_router(tmp_path / "router", queries[0], threshold=0.5).decision
    assert decision.model.name == "python"
    assert run_router(tmp_path / "router", queries[0], threshold=1.0).decision.model.name == "prose"
    result_run = run_router(tmp_path / "router", queries[1], generate=True, max_new_tokens=3)
    assert result_run.answer == _greedy_reference(Path(result_run.decision.model.folder), queries[1], 3)


def _greedy_reference(folder: Path, prompt: str, steps: int) -> str:
    """Greedy continuation by plain transformers calls: BOS + the prompt's tokens, the whole sequence
    re-run for every new token (no cache), stopping after EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = bos + tokenizer.encode(prompt, add_special_tokens=False)
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
            new.append(token)
            if token == tokenizer.eos_token_id:
                break
    return str(tokenizer.decode(new, skip_special_tokens=True))


def test_build_refuses_a_single_class(models: dict[str, Path], tmp_path: Path) -> None:
    data = write_data(tmp_path / "d.jsonl", [{"text": f"x{i}", "label": "c"} for i in range(6)])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(models, data, "labels: given\n"), encoding="utf-8")
    with pytest.raises(LabelError, match="all 6 training labels .* name 'c', so there is no choice"):
        build_router(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_model_router_needs_no_labels(models: dict[str, Path], tmp_path: Path) -> None:
    data = write_data(tmp_path / "d.jsonl", [{"text": "only one"}, {"text": "model here"}])
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  - model: {models['c']}\ndata: {data}\n", encoding="utf-8")
    build_router(recipe, tmp_path / "out")
    router = load_router(tmp_path / "out")
    assert (router.route_indices(["anything", "at all"], threshold=0.0) == 0).all()


def test_not_a_router_folder(tmp_path: Path, models: dict[str, Path]) -> None:
    with pytest.raises(RouterFolderError, match="not a fusekit router"):
        load_router(models["c"])
    with pytest.raises(RouterFolderError, match="no such folder"):
        load_router(tmp_path / "missing")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "router.json").write_text('{"format": "other"}', encoding="utf-8")
    with pytest.raises(RouterFolderError, match="lacks"):
        load_router(tmp_path / "bad")


def test_loss_labels_and_evaluation_against_independent_scores(models: dict[str, Path],
                                                               tmp_path: Path) -> None:
    from fusekit.lm import load_lm
    from fusekit.lm.score import score_text

    rows: list[dict[str, object]] = [{"text": t} for t, _ in synthetic(2, seed=5)]
    rows += [{"prompt": "def f(x):", "completion": " return x\n"},
             {"prompt": "The river", "completion": " ran dry."}]
    data = write_data(tmp_path / "d.jsonl", rows)
    examples = load_examples(data)
    scores = score_matrix([str(models[n]) for n in ("prose", "c", "python")], examples)
    for column, name in enumerate(("prose", "c", "python")):  # reference: each example scored alone
        lm = load_lm(models[name])
        for i, example in enumerate(examples):
            if example.completion is None:
                nll = score_text(lm, example.query).nll_nats
            else:
                nll = (score_text(lm, example.query + example.completion).nll_nats
                       - score_text(lm, example.query).nll_nats)
            assert scores.nll_bits[i, column] == pytest.approx(nll / math.log(2), rel=1e-4)
            assert scores.n_bytes[i] == len(example.scored_text.encode())
    recipe = tmp_path / "r.yaml"
    recipe.write_text(recipe_text(models, data, "router: knn\nfolds: 2\ncalibrate: 0.5\n"), encoding="utf-8")
    result = build_router(recipe, tmp_path / "router")
    labels = loss_labels(scores, result.router.order)
    counts = torch.bincount(labels, minlength=3)
    assert result.router.info["training"]["label_counts"] == dict(zip(["prose", "c", "python"],
                                                                      counts.tolist(), strict=True))
    report = evaluate_router(tmp_path / "router", data, thresholds=[0.0, 0.5, 1.0], shares=[0.5])
    bpb = scores.nll_bits.sum(0) / scores.n_bytes.sum()
    assert report.single == pytest.approx(dict(zip(["prose", "c", "python"], bpb.tolist(), strict=True)),
                                          rel=1e-4)
    assert report.oracle == pytest.approx(float(scores.nll_bits.min(1).values.sum() / scores.n_bytes.sum()),
                                          rel=1e-4)
    assert report.oracle <= min(report.single.values()) + 1e-9 and report.oracle <= report.routed + 1e-9
    chosen = load_router(tmp_path / "router").route_indices([e.query for e in examples])
    per_example = scores.bits_per_byte
    near = [per_example[i, int(c)] <= 1.01 * per_example[i].min() for i, c in enumerate(chosen)]
    assert report.near_oracle == pytest.approx(sum(near) / len(near))
    assert report.accuracy <= report.near_oracle
    assert report.merge is not None and report.merge_models == ["prose", "c", "python"]
    first, last = report.table[0], report.table[-1]
    assert first.shares["python"] == 1.0 and last.shares["prose"] == 1.0  # dearest / cheapest
    assert first.dear_share == 1.0 and last.dear_share == 0.0 and first.mean_cost == 4.0
    assert report.calibration[0].requested == 0.5
    assert json.loads(json.dumps(report.to_dict()))["best_single"]["model"] in report.single
    assert "cost-quality table" in report.format_text()


def test_features_model_missing_is_a_fusekit_error(models: dict[str, Path], tmp_path: Path) -> None:
    data = _given_data(tmp_path)
    for features in ("{type: hidden, model: ./no-such-model}", "{type: embedding, model: ./no-such-model}"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(recipe_text(models, data, f"labels: given\nfeatures: {features}\n"),
                          encoding="utf-8")
        with pytest.raises(FusekitError, match="features.model: .*no-such-model"):
            build_router(recipe, tmp_path / "out")


def test_embedding_and_hidden_routers_build(models: dict[str, Path], encoder: Path, tmp_path: Path) -> None:
    data = _given_data(tmp_path, n_per=4)
    for features in (f"{{type: embedding, model: {encoder}}}", f"{{type: hidden, model: {models['c']}}}"):
        recipe = tmp_path / "r.yaml"
        recipe.write_text(recipe_text(models, data, f"labels: given\nfeatures: {features}\nrouter: mlp\n"
                                      "folds: 0\n"), encoding="utf-8")
        result = build_router(recipe, tmp_path / "out", overwrite=True)
        loaded = load_router(tmp_path / "out")
        texts = ["int q;", "def q(): pass"]
        assert torch.allclose(loaded.probabilities(texts), result.router.probabilities(texts), atol=1e-5)
