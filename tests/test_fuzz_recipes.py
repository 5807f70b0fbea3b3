"""Fuzz every recipe kind: mutants of the recipes in configs/ must give exit 0 or 2, never a traceback
or a hang.

Each mutant is a recipe of ``configs/`` (merge, moe, ensemble, route) after one to three mutations:
delete a key, duplicate a key or a list item, retype a value (huge integers, ``1e400``, NaN, lists,
mappings, ...), swap the values of two keys, rename a key, or overwrite a few bytes of the YAML text.
It runs in this process through :func:`fusekit.cli.main` with the command that checks its kind
(``plan`` for merge and moe recipes, ``ensemble check``, ``route build``), in a tree whose model
references resolve to tiny demo models. A mutant that does not finish within ``FUSEKIT_FUZZ_TIMEOUT``
seconds (default 20) counts as a hang.

CI runs a few mutants per kind (about a minute in all on two cores); a long local run::

    FUSEKIT_FUZZ_EXAMPLES=2000 python -m pytest -q -s tests/test_fuzz_recipes.py
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import shutil
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusekit.cli import main

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs"
EXAMPLES = int(os.environ.get("FUSEKIT_FUZZ_EXAMPLES", "0"))  # per kind; 0: the CI default below
CI_EXAMPLES = {"merge": 50, "moe": 20, "ensemble": 25, "route": 25}
TIMEOUT = float(os.environ.get("FUSEKIT_FUZZ_TIMEOUT", "20"))
MODELS = ("base", "math", "code")
EXPERTS = ("python", "c", "prose", "prose-b")


def recipe_kind(path: Path) -> str | None:
    """merge, moe, ensemble or route for a recipe in configs/; None for a CI workflow or a
    multi-stage file (its documents are merge recipes the mutations below do not address)."""
    folder = path.relative_to(CONFIGS).parts[0]
    if folder in ("ensemble", "route", "moe"):
        return folder
    if folder in ("serve", "tune"):  # serve configs, tune recipes: checked by their own tests
        return None
    documents = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
    if len(documents) != 1:
        return None
    return None if "jobs" in documents[0] else "merge"


SEEDS: dict[str, list[Path]] = {}
for _path in sorted(CONFIGS.rglob("*.yaml"), key=lambda p: (len(p.relative_to(CONFIGS).parts), p)):
    _kind = recipe_kind(_path)
    if _kind is not None:
        SEEDS.setdefault(_kind, []).append(_path)


def command(kind: str, recipe: str) -> list[str]:
    """The fusekit command that checks a recipe of ``kind`` without running a merge or a model."""
    return {"merge": ["plan", recipe], "moe": ["plan", recipe], "ensemble": ["ensemble", "check", recipe],
            "route": ["route", "build", recipe, "router-out"]}[kind]


# -- mutations ------------------------------------------------------------------------------------

Choose = Callable[[int, int], int]  # (low, high) -> an integer in [low, high]
Path_ = tuple[Any, ...]

ODD_VALUES: list[Any] = [
    None, True, False, 0, -1, 1, 2, 10**9, 10**400, -(10**400), 1e400, -1e400, float("nan"), 1e-320,
    0.5, -0.5, 1.5, "", "x" * 300, "linear", "ties", "demo-out/models/base", "models/../../etc",
    "/dev/zero", "/", "demo-out", "*", "bf16", "int8", "\x00", "é", "{{ bos_token }}", [], [1, 2],
    [0, 10**400], ["a", 1], [[1]], {}, {"model": 1}, {"path": "demo-out/models/base", "revision": 3},
    {"filter": "mlp", "value": 1e400}, [{"filter": 5, "value": 1}], {"type": "knn", "k": 0},
]
KEYS = ["merge_method", "models", "model", "parameters", "weight", "density", "base_model", "slices",
        "sources", "layer_range", "dtype", "tokenizer_source", "tokenizer", "tokens", "chat_template",
        "residual_weight", "experts", "source_model", "positive_prompts", "gate_mode", "method",
        "generation", "max_new_tokens", "temperature", "data", "labels", "features", "router", "cost",
        "calibrate", "threshold", "folds", "seed", "max_iter", "tol", "batch_size", "k", "epochs"]


def _paths(node: Any, path: Path_ = ()) -> Iterator[Path_]:
    """Every path to a value under ``node`` (mapping keys and list indices), depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield (*path, key)
            yield from _paths(value, (*path, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield (*path, index)
            yield from _paths(value, (*path, index))


def _parent(data: Any, path: Path_) -> Any:
    for part in path[:-1]:
        data = data[part]
    return data


def _pick(choose: Choose, items: list[Any]) -> Any:
    return items[choose(0, len(items) - 1)]


def _delete(data: Any, path: Path_, choose: Choose) -> None:
    parent = _parent(data, path)
    del parent[path[-1]]


def _duplicate(data: Any, path: Path_, choose: Choose) -> None:
    parent = _parent(data, path)
    if isinstance(parent, list):
        parent.append(copy.deepcopy(parent[path[-1]]))
    else:
        parent[_pick(choose, KEYS)] = copy.deepcopy(parent[path[-1]])


def _retype(data: Any, path: Path_, choose: Choose) -> None:
    _parent(data, path)[path[-1]] = copy.deepcopy(_pick(choose, ODD_VALUES))  # later mutations edit it


def _rename(data: Any, path: Path_, choose: Choose) -> None:
    parent = _parent(data, path)
    if isinstance(parent, dict):
        parent[_pick(choose, KEYS)] = parent.pop(path[-1])


MUTATIONS = [_delete, _duplicate, _retype, _rename]


def _swap(data: Any, paths: list[Path_], choose: Choose) -> None:
    first, second = _pick(choose, paths), _pick(choose, paths)
    if first[:len(second)] == second or second[:len(first)] == first:
        return  # one contains the other
    a, b = _parent(data, first), _parent(data, second)
    a[first[-1]], b[second[-1]] = b[second[-1]], a[first[-1]]


def _bytes(text: bytes, choose: Choose) -> bytes:
    """Overwrite, insert or delete a few bytes, or duplicate a line (a duplicate YAML key)."""
    offset = choose(0, len(text))
    action = choose(0, 3)
    if action == 0:
        lines = text.splitlines(keepends=True)
        line = choose(0, len(lines) - 1)
        return b"".join([*lines[:line + 1], *lines[line:]])
    if action == 3:
        return text[:offset] + text[offset + choose(1, 16):]
    chunk = bytes(choose(0, 255) for _ in range(choose(1, 8)))
    end = offset + (len(chunk) if action == 1 else 0)
    return text[:offset] + chunk + text[end:]


def mutate(seed: Path, choose: Choose) -> bytes:
    """One mutant of ``seed``: one to three structural mutations, or a byte-level one."""
    text = seed.read_bytes()
    if choose(0, 4) == 0:
        return _bytes(text, choose)
    data = yaml.safe_load(text)
    for _ in range(choose(1, 3)):
        paths = list(_paths(data))
        if not paths:
            break
        if choose(0, 4) == 0:
            _swap(data, paths, choose)
        else:
            _pick(choose, MUTATIONS)(data, _pick(choose, paths), choose)
    return yaml.safe_dump(data, allow_unicode=True, sort_keys=False).encode("utf-8")


# -- running one mutant ---------------------------------------------------------------------------


class Hang(BaseException):
    """Raised by the alarm when a mutant runs past the time limit (not an Exception: nothing in the
    library may swallow it)."""


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise Hang()


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(args: list[str], timeout: float) -> tuple[str, int, str]:
    """(outcome, exit code, stderr): outcome is ``ok``, ``traceback`` or ``hang``."""
    out, err = io.StringIO(), io.StringIO()
    logging.getLogger().handlers.clear()  # main() installs a handler on the current stderr
    code = -1
    try:
        with _time_limit(timeout), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main(args)
    except SystemExit as exc:
        code = int(exc.code or 0) if not isinstance(exc.code, str) else 1
    except Hang:
        return "hang", code, err.getvalue()
    except Exception as exc:  # a traceback a user would see
        return "traceback", code, f"{type(exc).__name__}: {exc}"
    finally:
        logging.getLogger().handlers.clear()
    return "ok", code, err.getvalue()


# -- the tree and the tests -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No Hub access and an empty Hub cache, for the whole module."""
    import huggingface_hub.constants as constants

    cache = tmp_path_factory.mktemp("empty-hf-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("FUSEKIT_DEBUG", raising=False)
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setattr(constants, "HF_HUB_OFFLINE", True)
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        yield


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, offline: None) -> Path:
    """demo-out/models/*, demo-out/experts/* and parity-models/*/* all resolve to tiny models."""
    from fusekit.demo import build_demo_models

    root = tmp_path_factory.mktemp("fuzz")
    models = build_demo_models(root / "demo-out" / "models", hidden_size=32, num_layers=4,
                               num_attention_heads=4, num_key_value_heads=2)
    (root / "demo-out" / "experts").mkdir()
    for index, name in enumerate(EXPERTS):
        (root / "demo-out" / "experts" / name).symlink_to(models[MODELS[index % len(MODELS)]])
    for variant in ("f32", "bf16", "tied"):
        (root / "parity-models" / variant).mkdir(parents=True)
        for name in (*MODELS, "chat"):
            (root / "parity-models" / variant / name).symlink_to(models[MODELS[hash(name) % 3]])
    return root  # no demo-out/experts/data: a route build stops at the data, before any training


@contextlib.contextmanager
def _inside(folder: Path) -> Iterator[None]:
    previous = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(previous)


def _clean(root: Path) -> None:
    shutil.rmtree(root / "router-out", ignore_errors=True)


# test_configs.py validates every recipe; here the first of each kind (all of them in a long run)
CHECKED_SEEDS = [p for paths in SEEDS.values() for p in (paths if EXAMPLES else paths[:1])]


@pytest.mark.parametrize("seed", CHECKED_SEEDS, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_seed_recipes_run_their_check(seed: Path, tree: Path) -> None:
    """Unmutated recipes: no traceback, and merge, moe and ensemble recipes pass their check, so
    mutants start from recipes that reach the end of it."""
    kind = recipe_kind(seed)
    assert kind is not None
    with _inside(tree):
        outcome, code, err = run_cli(command(kind, str(seed)), timeout=120)
        _clean(tree)
    assert outcome == "ok", err
    if kind == "route":  # the data file is absent on purpose; so are an Arrow recipe's adapters
        assert code == 2 and ("data file" in err or "lora" in err), err
    elif "Hugging Face cache" not in err:  # configs/ci/ names a Hub model; the test runs offline
        assert code == 0, err


def test_the_harness_sees_tracebacks_and_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fuzz test can fail: an escaping exception and an endless run are both caught."""
    def broken(args: list[str]) -> None:
        raise OverflowError("int too large to convert to float")

    def endless(args: list[str]) -> None:
        while True:
            time.sleep(0.01)

    monkeypatch.setattr(sys.modules[__name__], "main", broken)
    assert run_cli(["plan", "x.yaml"], timeout=5)[0] == "traceback"
    monkeypatch.setattr(sys.modules[__name__], "main", endless)
    assert run_cli(["plan", "x.yaml"], timeout=0.3)[0] == "hang"


def test_the_seeds_cover_every_kind() -> None:
    assert set(SEEDS) == {"merge", "moe", "ensemble", "route"}
    assert all(len(paths) >= 2 for paths in SEEDS.values())


@pytest.mark.parametrize("kind", sorted(CI_EXAMPLES))
def test_mutants_exit_0_or_2_without_traceback_or_hang(kind: str, tree: Path) -> None:
    counts: Counter[str] = Counter()
    failures: list[str] = []
    mutant = tree / f"mutant-{kind}.yaml"

    @settings(max_examples=EXAMPLES or CI_EXAMPLES[kind], deadline=None, database=None,
              derandomize=not EXAMPLES, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def one(data: st.DataObject) -> None:
        def choose(low: int, high: int) -> int:
            return data.draw(st.integers(low, high))

        seed = _pick(choose, SEEDS[kind])
        mutant.write_bytes(mutate(seed, choose))
        start = time.perf_counter()
        with _inside(tree):
            outcome, code, err = run_cli(command(kind, mutant.name), TIMEOUT)
            _clean(tree)
        if outcome == "ok" and code not in (0, 2):
            outcome = f"exit {code}"
        if outcome == "ok" and code == 2 and "fusekit: error: " not in err:
            outcome = "no error line"
        counts[outcome if outcome != "ok" else f"exit {code}"] += 1
        if outcome != "ok" and len(failures) < 5:
            text = mutant.read_bytes().decode("utf-8", errors="replace")
            failures.append(f"{outcome} ({time.perf_counter() - start:.1f} s) from {seed.name}: "
                            f"{err.strip()[-400:]}\n--- mutant ---\n{text[:1500]}")

    start = time.perf_counter()
    one()
    total = sum(counts.values())
    bad = total - counts["exit 0"] - counts["exit 2"]
    print(f"\n{kind}: {total} mutants in {time.perf_counter() - start:.0f} s, {bad} failures: "
          f"{dict(counts)}", file=sys.stderr)
    assert not failures, "\n\n".join(failures)
