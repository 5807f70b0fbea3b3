"""The score cache: cached scores equal fresh ones, a changed model, text or setting is scored again,
writes are atomic and bounded, ``--no-cache`` bypasses it, and a second router build scores nothing."""

from __future__ import annotations

import json
import math
import os
import threading
import time
from pathlib import Path

import pytest

import fusekit.lm.score_cache as sc
from fusekit.demo import build_demo_models
from fusekit.lm import load_lm
from fusekit.lm.score import TextScore, score_text

TEXTS = ["def f(x):\n    return x + 1\n", "The river ran dry.\n", "int main(void) { return 0; }\n"]


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("FUSEKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FUSEKIT_SCORE_CACHE", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return build_demo_models(tmp_path_factory.mktemp("score-cache"), names=("a", "b", "c"), hidden_size=32,
                             num_layers=2, num_attention_heads=4, num_key_value_heads=2)


class Counting:
    """Wraps ``_score_now``: counts the texts actually scored."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.texts: list[str] = []
        real = sc._score_now

        def wrapped(ref: str, texts: list[str], **kw: object) -> list[TextScore]:
            self.texts += texts
            return real(ref, texts, **kw)  # type: ignore[arg-type]

        monkeypatch.setattr(sc, "_score_now", wrapped)


def test_cached_scores_equal_fresh_ones_and_skip_the_model(models: dict[str, Path],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch)
    first = sc.score_texts_cached(str(models["a"]), TEXTS)
    assert counting.texts == TEXTS
    second = sc.score_texts_cached(str(models["a"]), [TEXTS[2], TEXTS[0], TEXTS[0]])
    assert counting.texts == TEXTS  # nothing scored, the model not even loaded
    lm = load_lm(models["a"])
    for text, cached in zip([TEXTS[2], TEXTS[0], TEXTS[0]], second, strict=True):
        fresh = score_text(lm, text)  # independent: one text, one window, no cache
        assert (cached.n_bytes, cached.n_tokens) == (fresh.n_bytes, fresh.n_tokens)
        assert cached.nll_nats == pytest.approx(fresh.nll_nats, rel=1e-5)
    assert second[1].nll_nats == first[0].nll_nats  # exactly what was stored


def test_new_text_setting_or_model_is_scored_again(models: dict[str, Path], tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch)
    sc.score_texts_cached(str(models["a"]), TEXTS)
    sc.score_texts_cached(str(models["a"]), [*TEXTS, "new text\n"])
    assert counting.texts[3:] == ["new text\n"]
    sc.score_texts_cached(str(models["a"]), TEXTS[:1], context=8)  # another window: another key
    sc.score_texts_cached(str(models["b"]), TEXTS[:1])  # another model
    assert counting.texts[4:] == [TEXTS[0], TEXTS[0]]
    copy = tmp_path / "a-copy"  # same content elsewhere: same digest, a hit
    copy.mkdir()
    for path in models["a"].iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    sc.score_texts_cached(str(copy), TEXTS)
    assert len(counting.texts) == 6
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # one bit of one weight: a different model
    weights.write_bytes(bytes(data))
    sc.score_texts_cached(str(copy), TEXTS)
    assert counting.texts[6:] == TEXTS


def test_no_cache_reads_and_writes_nothing(models: dict[str, Path], own_cache: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    counting = Counting(monkeypatch)
    sc.score_texts_cached(str(models["a"]), TEXTS, use_cache=False)
    assert not (own_cache / sc.SCORES_DIR).exists()
    sc.score_texts_cached(str(models["a"]), TEXTS)
    sc.score_texts_cached(str(models["a"]), TEXTS, use_cache=False)
    monkeypatch.setenv("FUSEKIT_SCORE_CACHE", "0")
    sc.score_texts_cached(str(models["a"]), TEXTS)
    assert counting.texts == TEXTS * 4


def _key(n: int) -> sc.ScoreKey:
    return sc.ScoreKey(f"{n:064x}", None, None, "float32", "cpu")


def test_corrupt_files_count_as_empty_and_are_replaced(own_cache: Path) -> None:
    cache = sc.ScoreCache()
    path = cache.folder / _key(1).file_name()
    path.parent.mkdir(parents=True)
    for junk in ("{", "[]", '{"scores": {"d": [1, 2]}}', '{"scores": 3}'):
        path.write_text(junk, encoding="utf-8")
        assert cache.get(_key(1), ["d"]) == {}
    cache.put(_key(1), {"e": TextScore(5, 2, 1.5)}, ref="m")
    assert cache.get(_key(1), ["d", "e"]) == {"e": TextScore(5, 2, 1.5)}
    assert json.loads(path.read_text(encoding="utf-8"))["scores"] == {"e": [5, 2, 1.5]}


def test_concurrent_writers_never_tear_the_file(own_cache: Path) -> None:
    cache = sc.ScoreCache()
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(40):
                cache.put(_key(0), {f"{n}-{i}": TextScore(i + 1, 1, float(i))}, ref="m")
                assert cache.get(_key(0), [f"{n}-{i}"]) or True  # a read mid-write parses
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    entries = json.loads((cache.folder / _key(0).file_name()).read_text(encoding="utf-8"))["scores"]
    assert entries and all(v[0] == int(k.split("-")[1]) + 1 for k, v in entries.items())
    assert not [p for p in cache.folder.iterdir() if p.name.startswith(".")]  # no temp files left


def test_the_cache_is_bounded_least_recently_used_first(own_cache: Path) -> None:
    cache = sc.ScoreCache()
    for n in range(4):
        cache.put(_key(n), {f"t{i}": TextScore(1, 1, 0.5) for i in range(50)}, ref=f"m{n}")
        stamp = time.time() - 100 + n
        os.utime(cache.folder / _key(n).file_name(), (stamp, stamp))
    assert cache.get(_key(0), ["t1"])  # a hit makes m0 the most recently used
    size = (cache.folder / _key(0).file_name()).stat().st_size
    assert cache.prune(2 * size + 10) == 2
    left = {p.name for p in cache.files()}
    assert left == {_key(0).file_name(), _key(3).file_name()}
    assert cache.info()["files"] == 2 and cache.info()["scores"] == 100
    assert cache.clear() == 2 and cache.files() == []


def _route_recipe(models: dict[str, Path], tmp_path: Path, n: int) -> Path:
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "omega"]
    templates = ["def {w}(x):\n    return {n}\n", "int {w} = {n};\n", "The {w} ran {n} miles.\n"]
    rows = [{"text": rng.choice(templates).format(w=rng.choice(words), n=rng.randint(1, 999))}
            for _ in range(n)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"models:\n  - model: {models['a']}\n    cost: 1\n"
                      f"  - model: {models['b']}\n    cost: 2\n"
                      f"  - model: {models['c']}\n    cost: 4\ndata: {data}\nrouter: knn\nfolds: 2\n",
                      encoding="utf-8")
    return recipe


def test_a_second_router_build_scores_nothing(models: dict[str, Path], tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from fusekit.route import build_router, evaluate_router

    recipe = _route_recipe(models, tmp_path, 30)
    counting = Counting(monkeypatch)
    first = build_router(recipe, tmp_path / "r1")
    assert len(counting.texts) == 3 * len(set(counting.texts[:30])) > 0
    scored = len(counting.texts)
    second = build_router(recipe, tmp_path / "r2")
    assert len(counting.texts) == scored  # every score came from the cache
    assert second.router.info["training"] == first.router.info["training"]
    assert second.router.threshold == first.router.threshold
    with capsys.disabled():
        print(f"\nroute build: first {first.seconds:.2f} s, second (cached) {second.seconds:.2f} s")
    report = evaluate_router(tmp_path / "r2", recipe.parent / "d.jsonl", with_merge=False)
    assert len(counting.texts) == scored  # eval on the training data: all cached too
    assert not math.isnan(report.routed)
    evaluate_router(tmp_path / "r2", recipe.parent / "d.jsonl", with_merge=False, use_cache=False)
    assert len(counting.texts) == 2 * scored


def test_cache_commands(models: dict[str, Path], own_cache: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fusekit.cli import main

    sc.score_texts_cached(str(models["a"]), TEXTS)
    with pytest.raises(SystemExit) as info:
        main(["cache", "info", "--json"])
    assert info.value.code in (0, None)
    report = json.loads(capsys.readouterr().out)
    assert report["folder"] == str(own_cache) and report["scores"]["scores"] == 3
    with pytest.raises(SystemExit) as info:
        main(["cache", "clear"])
    assert info.value.code in (0, None) and "deleted 1 score file(s)" in capsys.readouterr().out
    assert sc.ScoreCache().files() == []
