"""Byte-identical rebuilds (issue 20, item 1): ``--locked`` reuses the lock's seed, a recipe may pin
``random_seed:``, a deterministic method records no seed, and no written file holds a timestamp."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import in_process_cli, write_recipe

import fusekit
from fusekit.errors import FusekitError, LockMismatchError
from fusekit.io.lock import LOCK_FILE

SHARD = 20_000  # several shards and an index


def dare(folder: Path, models: dict[str, Path], extra: str = "") -> Path:
    """A stochastic recipe: DARE's random masks make the weights depend on the seed."""
    return write_recipe(folder / "dare.yaml", f"merge_method: dare_ties\nbase_model: {models['base']}\n"
                        f"{extra}models:\n"
                        f"  - model: {models['math']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                        f"  - model: {models['code']}\n    parameters: {{weight: 0.5, density: 0.5}}\n")


def digests(folder: Path) -> dict[str, str]:
    """sha256 of every file in an output folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def lock(folder: Path) -> dict[str, object]:
    return json.loads((folder / LOCK_FILE).read_text(encoding="utf-8"))  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def first(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A first build with no seed given (one is picked), its lock copied to ``ci.lock`` as CI keeps it."""
    root = tmp_path_factory.mktemp("rebuild")
    recipe = dare(root, tiny_models)
    result = fusekit.merge(recipe, root / "first" / "out", out_shard_size=SHARD)
    assert isinstance(result.seed, int)
    shutil.copy(root / "first" / "out" / LOCK_FILE, root / "ci.lock")
    return root


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    return in_process_cli(capsys)


def test_two_locked_rebuilds_in_fresh_folders_are_byte_identical(
        first: Path, cli: Callable[..., tuple[int, str, str]]) -> None:
    recipe, pinned = first / "dare.yaml", first / "ci.lock"
    built = {}
    for name in ("a", "b"):
        code, _, err = cli("merge", str(recipe), str(first / name / "out"), "--locked", "--lock-file",
                           str(pinned), "--out-shard-size", str(SHARD), "-q")
        assert code == 0, err
        built[name] = digests(first / name / "out")
    original = digests(first / "first" / "out")
    assert built["a"] == built["b"] == original  # every file: shards, index, card, recipe, lock
    assert {"model.safetensors.index.json", "README.md", "mergekit_config.yml", LOCK_FILE} <= set(original)
    assert len([n for n in original if n.endswith(".safetensors")]) > 2
    # the test can fail: without the lock's seed the weights differ
    other = int(lock(first / "first" / "out")["random_seed"]) + 1  # type: ignore[call-overload]
    fusekit.merge(recipe, first / "c" / "out", out_shard_size=SHARD, random_seed=other)
    changed = {n for n, d in digests(first / "c" / "out").items() if original.get(n) != d}
    assert {n for n in original if n.endswith(".safetensors")} <= changed


def test_an_explicit_seed_that_contradicts_the_lock_is_one_line(
        first: Path, cli: Callable[..., tuple[int, str, str]], tiny_models: dict[str, Path],
        tmp_path: Path) -> None:
    seed = int(lock(first / "first" / "out")["random_seed"])  # type: ignore[call-overload]
    args = ["--locked", "--lock-file", str(first / "ci.lock"), "--out-shard-size", str(SHARD)]
    code, out, err = cli("merge", str(first / "dare.yaml"), str(first / "x" / "out"), *args,
                         "--random-seed", str(seed + 1))
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1, err
    assert f"--random-seed is {seed + 1}" in lines[0] and f"pins random seed {seed}" in lines[0]
    assert not (first / "x").exists()
    pinned = dare(tmp_path, tiny_models, extra=f"random_seed: {seed + 2}\n")
    with pytest.raises(LockMismatchError, match="the recipe's random_seed is"):
        fusekit.merge(pinned, first / "y" / "out", locked=True, lock_file=first / "ci.lock")
    with pytest.raises(FusekitError, match="--lock-file .*: no such file"):
        fusekit.merge(first / "dare.yaml", first / "z" / "out", lock_file=first / "missing.lock")
    assert not (first / "y").exists() and not (first / "z").exists()


def test_seed_precedence(first: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """--random-seed > the recipe's random_seed: > the lock's (--lock-file) > a fresh one."""
    locked_seed = lock(first / "first" / "out")["random_seed"]
    pinned = dare(tmp_path, tiny_models, extra="random_seed: 5\n")
    assert fusekit.merge(pinned, tmp_path / "r", lock_file=first / "ci.lock").seed == 5
    assert lock(tmp_path / "r")["random_seed"] == 5
    assert "--random-seed 5`" in (tmp_path / "r" / "README.md").read_text(encoding="utf-8")
    assert fusekit.merge(pinned, tmp_path / "o", random_seed=6).seed == 6
    plain = first / "dare.yaml"
    assert fusekit.merge(plain, tmp_path / "l", lock_file=first / "ci.lock").seed == locked_seed
    again = fusekit.merge(pinned, tmp_path / "r")  # no seed given: the up-to-date check takes the lock's
    assert again.up_to_date and again.seed == 5


def test_a_deterministic_merge_records_no_seed(tiny_models: dict[str, Path], tmp_path: Path,
                                               cli: Callable[..., tuple[int, str, str]]) -> None:
    recipe = write_recipe(tmp_path / "linear.yaml", "merge_method: linear\nmodels:\n"
                          f"  - model: {tiny_models['math']}\n    parameters: {{weight: 0.3}}\n"
                          f"  - model: {tiny_models['code']}\n    parameters: {{weight: 0.7}}\n")
    a, b = tmp_path / "a" / "out", tmp_path / "b" / "out"
    code, out, err = cli("merge", str(recipe), str(a), "--json")
    assert code == 0, err
    assert json.loads(out)["random_seed"] is None
    assert "random_seed" not in lock(a)
    card = (a / "README.md").read_text(encoding="utf-8")
    assert "random-seed" not in card and "random seed" not in card.lower()
    result = fusekit.merge(recipe, b, random_seed=123)  # a seed changes nothing here
    assert result.seed is None and digests(a) == digests(b)
    assert fusekit.merge(recipe, a, locked=True).up_to_date


def test_no_written_file_holds_a_timestamp(first: Path) -> None:
    """Each file is checked: text files and every shard's safetensors header (its metadata)."""
    folder = first / "first" / "out"
    date = re.compile(r"(19|20)\d\d-[01]\d-[0-3]\d|\d\d:\d\d:\d\d")
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        if path.suffix == ".safetensors":
            (size,) = struct.unpack("<Q", data[:8])
            text = data[8:8 + size].decode("utf-8")
            assert set(json.loads(text).get("__metadata__", {})) <= {"format"}, path.name
        else:
            text = data.decode("utf-8")
        assert not date.search(text), f"{path.name}: {date.search(text)}"
