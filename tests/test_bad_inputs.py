"""The bad-inputs corpus: every case through the real CLI gives exit 2, one line naming the culprit,
no traceback and no output; plus a fuzz test of the recipe loader and disk-full/permission errors.

Text cases are the recipes in tests/bad_inputs/ (first line ``# culprit: TEXT``, optionally
``# args: ...``); binary cases (corrupt, lying and hostile checkpoints) are built at session start by
scripts/make_bad_inputs.py. The CLI entry point ``fusekit.cli.main`` runs in this process (a fresh
interpreter per case would take minutes); test_cli.py covers the same entry point in subprocesses.
"""

from __future__ import annotations

import errno
import importlib.util
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import in_process_cli
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusekit.errors import FusekitError
from fusekit.io.writer import partial_folders
from fusekit.recipe import MergeRecipe, parse_merge_recipe

ROOT = Path(__file__).resolve().parent.parent
TEXT_DIR = Path(__file__).parent / "bad_inputs"
_spec = importlib.util.spec_from_file_location("make_bad_inputs", ROOT / "scripts" / "make_bad_inputs.py")
assert _spec is not None and _spec.loader is not None
make_bad_inputs: Any = importlib.util.module_from_spec(_spec)
sys.modules["make_bad_inputs"] = make_bad_inputs  # dataclasses look their module up there
_spec.loader.exec_module(make_bad_inputs)

GOOD = ("merge_method: linear\nmodels:\n  - {model: models/base, parameters: {weight: 0.5}}\n"
        "  - {model: models/math, parameters: {weight: 0.5}}\n")
OPTION_CASES = {  # name -> (arguments after the recipe and output, culprit)
    "shard_size_zero": (["--out-shard-size", "0"], "--out-shard-size"),
    "shard_size_words": (["--out-shard-size", "lots"], "--out-shard-size"),
    "max_memory_negative": (["--max-memory", "-5GB"], "--max-memory"),
    "max_memory_400_digits": (["--max-memory", "1" + "0" * 400], "--max-memory"),
    "max_memory_nan": (["--max-memory", "nan"], "--max-memory"),
    "shard_size_1e400": (["--out-shard-size", "1e400"], "--out-shard-size"),
    "shard_size_inf": (["--out-shard-size", "inf"], "--out-shard-size"),
    "device_missing_gpu": (["--device", "cuda"], "--device cuda"),
    "push_bad_repo_id": (["--push-to-hub", "../../etc"], "../../etc"),
    "locked_without_lock": (["--locked"], "fusekit.lock"),
}


def _text_case(path: Path) -> tuple[str, list[str]]:
    culprit, args = "", []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines()[:2]:
        if line.startswith("# culprit:"):
            culprit = line.split(":", 1)[1].strip()
        elif line.startswith("# args:"):
            args = shlex.split(line.split(":", 1)[1])
    assert culprit, f"{path.name} lacks a '# culprit:' first line"
    return culprit, args


CASES: dict[str, tuple[str, str, list[str]]] = {}  # id -> (recipe, culprit, args)
for _path in sorted(TEXT_DIR.glob("*.yaml")):
    _culprit, _args = _text_case(_path)
    CASES[f"recipe/{_path.stem}"] = (f"recipes/{_path.name}", _culprit, _args)
for _name, _case in make_bad_inputs.CASES.items():
    CASES[f"checkpoint/{_name}"] = (f"recipes/{_name}.yaml", _case.culprit or f"bad/{_name}",
                                    list(_case.args))
for _name, _recipe_case in make_bad_inputs.RECIPE_CASES.items():
    CASES[f"recipe/{_name}"] = (_recipe_case.path, _recipe_case.culprit, [])
for _name, (_args, _culprit) in OPTION_CASES.items():
    CASES[f"option/{_name}"] = ("good.yaml", _culprit, _args)


def test_corpus_is_large_enough() -> None:
    assert len(CASES) >= 50


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad") / "tree"
    manifest = make_bad_inputs.build(root)
    assert {f"checkpoint/{n}" for n in make_bad_inputs.CASES} <= set(CASES)
    assert "recipe_not_utf8" in manifest
    (root / "good.yaml").write_text(GOOD, encoding="utf-8")
    return root


@pytest.fixture
def cli(tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """Run ``fusekit ...`` in the tree, offline with an empty Hub cache; return (code, out, err)."""
    import huggingface_hub.constants as constants

    cache = tree.parent / "empty-hf-cache"
    cache.mkdir(exist_ok=True)
    monkeypatch.chdir(tree)
    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))

    return in_process_cli(capsys)


_COUNT = re.compile(r"^(?:fusekit: error: )?(\d+) problems in .+:$")


def problem_lines(message: str) -> list[str]:
    """The problems of an error message: its one line, or, when its first line counts several
    ("N problems in FILE:"), the N lines after it (each indented; past 20, a last line counts the rest)."""
    lines = message.strip("\n").splitlines()
    if len(lines) == 1:
        return lines
    count = _COUNT.match(lines[0])
    assert count is not None, f"a multi-line error must start by counting its problems:\n{message}"
    listed = lines[1:]
    assert all(line.startswith("  ") and line.strip() for line in listed), message
    assert len(listed) == min(int(count[1]), 20) + (int(count[1]) > 20), message
    return [line.strip() for line in listed]


def test_problem_lines_can_fail() -> None:
    assert problem_lines("r.yaml:1:1 x: bad\n") == ["r.yaml:1:1 x: bad"]
    assert problem_lines("2 problems in r.yaml:\n  r.yaml:1:1 a\n  r.yaml:2:1 b") == ["r.yaml:1:1 a",
                                                                                     "r.yaml:2:1 b"]
    for bad in ("first\nsecond", "3 problems in r.yaml:\n  a\n  b", "2 problems in r.yaml:\n  a\nb"):
        with pytest.raises(AssertionError):
            problem_lines(bad)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_one_line_and_leaves_nothing(case: str, tree: Path, cli: Any) -> None:
    """One line, or a counted list of problems one per line (a recipe with several problems)."""
    recipe, culprit, args = CASES[case]
    code, out, err = cli("merge", recipe, "out", *args)
    assert code == 2, f"exit {code}: {err}"
    assert err.startswith("fusekit: error: ") and problem_lines(err), err
    assert culprit in err, err
    assert "Traceback" not in err and "a pickle ran code" not in out + err
    assert "fusekit-was-exploited" not in out + err
    assert not (tree / "out").exists() and partial_folders(tree / "out") == []


def test_a_case_through_a_real_process(tree: Path, run_cli: Any) -> None:
    """The same contract when the console script runs in its own interpreter."""
    for recipe, culprit in (("recipes/python_tag.yaml", "python_tag.yaml"),
                            ("recipes/header_length_huge.yaml", "bad/header_length_huge")):
        proc = run_cli("merge", recipe, "out", cwd=tree, env={"HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and culprit in proc.stderr
    assert not (tree / "out").exists()


@pytest.mark.parametrize(("fail", "expected"), [
    ("pwrite", "the disk is full"), ("open", "permission denied"), ("mkdir", "permission denied")])
def test_write_errors_are_one_line_and_remove_the_output(fail: str, expected: str, tree: Path,
                                                         cli: Any,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """ENOSPC and EACCES while writing, simulated in-process by failing the system calls the
    writer uses (the tests run as root, for whom permission bits do not apply)."""
    real_open, real_mkdir = os.open, Path.mkdir

    def pwrite(fd: int, data: Any, offset: int) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith(".safetensors") and flags & os.O_WRONLY:
            raise PermissionError(errno.EACCES, "Permission denied")
        return real_open(path, flags, *args, **kwargs)

    def mkdir(self: Path, *args: Any, **kwargs: Any) -> None:
        if ".fusekit-partial-" in self.name:
            raise PermissionError(errno.EACCES, "Permission denied")
        real_mkdir(self, *args, **kwargs)

    replacement = {"pwrite": ("os.pwrite", pwrite), "open": ("os.open", open_),
                   "mkdir": ("pathlib.Path.mkdir", mkdir)}[fail]
    monkeypatch.setattr(*replacement)
    code, _, err = cli("merge", "good.yaml", "out", "--random-seed", "1")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tree / "out").exists() and partial_folders(tree / "out") == []


_KEYS = ["merge_method", "models", "model", "parameters", "weight", "density", "base_model",
         "slices", "sources", "layer_range", "dtype", "out_dtype", "tokenizer_source", "filter",
         "value", "t", "normalize", "chat_template", "tokenizer", "epsilon"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.floats(allow_nan=True),
                     st.sampled_from(["linear", "ties", "slerp", "passthrough", "models/base",
                                      "bf16", "*", "self_attn", ""]),
                     st.text(max_size=8))
_values = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4),
    st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=5), inner, max_size=5)), max_leaves=25)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(_KEYS), _values, max_size=6).map(
        lambda d: yaml.safe_dump(d, allow_unicode=True)),
    st.lists(st.sampled_from(["merge_method: linear", "models:", "  - model: a", "    parameters:",
                              "      weight: 1", "- [", "&a x", "*a", "!!python/none", "? [1]",
                              "  weight: .nan", "dtype: bf16", "---", "{", "}", "\t"]),
             max_size=10).map("\n".join)))
def test_recipe_loader_gives_a_recipe_or_a_fusekit_error(text: str) -> None:
    try:
        recipe, _ = parse_merge_recipe(text, "fuzz.yaml")
    except FusekitError as exc:
        assert all(line.startswith("fuzz.yaml") for line in problem_lines(str(exc))), str(exc)
    else:
        assert isinstance(recipe, MergeRecipe)
