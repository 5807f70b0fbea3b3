"""fusekit.lock: its content, up-to-date detection, --force, --locked, and Hub inputs' commits."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_recipe

import fusekit
from fusekit.errors import FusekitError, LockMismatchError, OutputExistsError
from fusekit.io.lock import LOCK_FILE, library_versions, read_lock, seal_output, verify_output

COMMIT = "89abcdef0123456789abcdef0123456789abcdef"


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def linear(folder: Path, a: Path | str, b: Path | str, weight: float = 0.3) -> Path:
    return write_recipe(folder / "recipe.yaml", "merge_method: linear\nmodels:\n"
                        f"  - model: {a}\n    parameters: {{weight: {weight}}}\n"
                        f"  - model: {b}\n    parameters: {{weight: {1 - weight}}}\n")


def dare(folder: Path, a: Path | str, b: Path | str) -> Path:
    """A stochastic recipe: its output depends on the seed, which the lock records."""
    return write_recipe(folder / "recipe.yaml", f"merge_method: dare_linear\nbase_model: {a}\nmodels:\n"
                        f"  - model: {b}\n    parameters: {{weight: 0.5, density: 0.5}}\n")


@pytest.fixture
def models(tiny_models: dict[str, Path], tmp_path: Path) -> dict[str, Path]:
    """Private copies, so tests may change them."""
    copies = {}
    for name in ("base", "math"):
        copies[name] = tmp_path / "models" / name
        shutil.copytree(tiny_models[name], copies[name])
    return copies


def mtimes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}


def test_lock_records_versions_recipe_inputs_seed_and_outputs(models: dict[str, Path],
                                                             tmp_path: Path) -> None:
    recipe = linear(tmp_path, models["base"], models["math"])
    fusekit.merge(recipe, tmp_path / "out", out_shard_size=20_000, random_seed=11)
    lock = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    assert lock["versions"] == library_versions() and set(lock["versions"]) >= {
        "fusekit", "torch", "safetensors"}
    assert lock["recipe"]["sha256"] == sha(recipe)
    assert "random_seed" not in lock  # linear draws no random numbers (see test_rebuild.py)
    assert lock["options"] == {"out_shard_size": 20_000, "copy_tokenizer": True}
    assert set(lock["inputs"]) == {"models/base", "models/math"}  # relative to the recipe's folder
    for name, folder in models.items():
        files = lock["inputs"][f"models/{name}"]["files"]
        assert files["model.safetensors"] == {"size": (folder / "model.safetensors").stat().st_size,
                                              "sha256": sha(folder / "model.safetensors")}
        assert files["config.json"]["sha256"] == sha(folder / "config.json"), name
    outputs = {p.name for p in (tmp_path / "out").iterdir()} - {LOCK_FILE}
    assert set(lock["outputs"]) == outputs and len(outputs) > 5
    for name, row in lock["outputs"].items():
        assert row == {"size": (tmp_path / "out" / name).stat().st_size,
                       "sha256": sha(tmp_path / "out" / name)}


def test_up_to_date_output_is_not_recomputed(models: dict[str, Path], tmp_path: Path,
                                             run_cli: Callable[..., object]) -> None:
    recipe = dare(tmp_path, models["base"], models["math"])
    out = tmp_path / "out"
    first = fusekit.merge(recipe, out, random_seed=2)
    before = mtimes(out)
    again = fusekit.merge(recipe, out)  # no seed given: the lock's is used
    assert again.up_to_date and again.seed == first.seed == 2 and mtimes(out) == before
    proc = run_cli("merge", recipe, out, cwd=tmp_path)
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stderr  # type: ignore[attr-defined]
    assert mtimes(out) == before
    forced = fusekit.merge(recipe, out, force=True, random_seed=2)
    assert not forced.up_to_date and mtimes(out) != before
    assert sha(out / "model.safetensors") == json.loads((out / LOCK_FILE).read_text())[
        "outputs"]["model.safetensors"]["sha256"]


@pytest.mark.parametrize("change", ["recipe", "input", "output", "seed"])
def test_stale_output_needs_overwrite_and_is_rebuilt(change: str, models: dict[str, Path],
                                                     tmp_path: Path) -> None:
    recipe = (dare if change == "seed" else linear)(tmp_path, models["base"], models["math"])
    out = tmp_path / "out"
    fusekit.merge(recipe, out, random_seed=4)
    seed = 4
    if change == "recipe":
        recipe = linear(tmp_path, models["base"], models["math"], weight=0.7)
    elif change == "input":
        config = models["math"] / "generation_config.json"
        config.write_text(config.read_text() + " ")
    elif change == "output":
        with (out / "model.safetensors").open("r+b") as handle:
            handle.seek(-1, os.SEEK_END)
            last = handle.read(1)
            handle.seek(-1, os.SEEK_END)
            handle.write(bytes([last[0] ^ 1]))
    else:
        seed = 5
    with pytest.raises(OutputExistsError, match="out of date"):
        fusekit.merge(recipe, out, random_seed=seed)
    result = fusekit.merge(recipe, out, random_seed=seed, overwrite=True)
    assert not result.up_to_date
    assert fusekit.merge(recipe, out, random_seed=seed).up_to_date


def test_locked_fails_when_an_input_differs(models: dict[str, Path], tmp_path: Path,
                                            run_cli: Callable[..., object]) -> None:
    recipe = linear(tmp_path, models["base"], models["math"])
    out = tmp_path / "out"
    fusekit.merge(recipe, out, random_seed=1)
    pinned = tmp_path / "pinned.lock"
    shutil.copy(out / LOCK_FILE, pinned)
    assert fusekit.merge(recipe, out, locked=True).up_to_date
    fusekit.merge(recipe, tmp_path / "elsewhere", locked=True, lock_file=pinned, random_seed=1)
    with pytest.raises(LockMismatchError, match="lock file not found"):
        fusekit.merge(recipe, tmp_path / "new", locked=True)
    weights = models["math"] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    proc = run_cli("merge", recipe, tmp_path / "ci", "--locked", "--lock-file", pinned, cwd=tmp_path)
    stderr = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 2, stderr  # type: ignore[attr-defined]
    assert len(stderr.strip().splitlines()) == 1 and "model.safetensors changed" in stderr
    assert "'models/math'" in stderr and not (tmp_path / "ci").exists()


def _add_to_cache(cache: Path, repo_id: str, source: Path, commit: str) -> None:
    """huggingface_hub's cache layout: blobs, refs/main and a snapshot of symlinks."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for file in source.iterdir():
        blob = repo / "blobs" / sha(file)
        blob.write_bytes(file.read_bytes())
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)


def test_hub_inputs_are_locked_by_commit(models: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-home" / "hub"
    _add_to_cache(cache, "fusekit-test/math", models["math"], COMMIT)
    for name, value in {"HF_HOME": cache.parent, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    recipe = linear(tmp_path, models["base"], "fusekit-test/math")
    fusekit.merge(recipe, tmp_path / "out", random_seed=1)
    lock = json.loads((tmp_path / "out" / LOCK_FILE).read_text())
    entry = lock["inputs"]["fusekit-test/math"]
    assert entry["hub_id"] == "fusekit-test/math" and entry["revision"] == COMMIT
    weights = models["math"] / "model.safetensors"
    assert entry["files"]["model.safetensors"]["size"] == weights.stat().st_size
    assert "sha256" not in entry["files"]["model.safetensors"]  # the commit names the content
    assert str(tmp_path) not in (tmp_path / "out" / LOCK_FILE).read_text()
    # a lock pinned to another commit makes --locked fail
    lock["inputs"]["fusekit-test/math"]["revision"] = "0" * 40
    (tmp_path / "old.lock").write_text(json.dumps(lock))
    with pytest.raises(LockMismatchError, match="resolves to commit"):
        fusekit.merge(recipe, tmp_path / "again", locked=True, lock_file=tmp_path / "old.lock")


def _edit_in_place(path: Path) -> None:
    """Flip the last byte, then put the size and modification time back (what `git checkout` or a
    careless script can do); only the ctime shows it."""
    info = path.stat()
    with path.open("r+b") as handle:
        handle.seek(-1, os.SEEK_END)
        last = handle.read(1)
        handle.seek(-1, os.SEEK_END)
        handle.write(bytes([last[0] ^ 1]))
    os.utime(path, ns=(info.st_atime_ns, info.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (info.st_size, info.st_mtime_ns)


def _poison_cache(path: Path, digest: str) -> None:
    """Make the digest cache claim ``digest`` for ``path`` as it is now (a file system whose ctime
    cannot be trusted), so that only a re-hash can see the truth."""
    from fusekit.io.digests import DigestCache

    cache = DigestCache()
    cache.digest(path)
    key = str(path.resolve())
    cache._entries[key] = [*cache._entries[key][:5], digest]
    cache._changed = True
    cache.save()


def test_lock_and_card_hold_no_absolute_path(models: dict[str, Path], tmp_path: Path) -> None:
    """The recipe names both models by absolute path; the lock and card name them relative to it."""
    recipe = linear(tmp_path, models["base"], models["math"])
    assert str(models["base"]) in recipe.read_text()
    fusekit.merge(recipe, tmp_path / "out", random_seed=1)
    for name in (LOCK_FILE, "README.md"):
        text = (tmp_path / "out" / name).read_text()
        assert str(tmp_path) not in text and "/tmp" not in text, name
        assert "models/math" in text, name


def test_an_input_edited_in_place_is_noticed(models: dict[str, Path], tmp_path: Path) -> None:
    recipe = linear(tmp_path, models["base"], models["math"])
    out = tmp_path / "out"
    fusekit.merge(recipe, out, random_seed=1)
    shutil.copy(out / LOCK_FILE, tmp_path / "pinned.lock")
    _edit_in_place(models["math"] / "model.safetensors")
    with pytest.raises(OutputExistsError, match="model.safetensors changed"):
        fusekit.merge(recipe, out)  # the digest cache is keyed on ctime too
    _poison_cache(models["math"] / "model.safetensors",
                  json.loads((out / LOCK_FILE).read_text())["inputs"]["models/math"]["files"][
                      "model.safetensors"]["sha256"])
    with pytest.raises(LockMismatchError, match="model.safetensors changed"):
        fusekit.merge(recipe, tmp_path / "ci", locked=True, lock_file=tmp_path / "pinned.lock")


@pytest.mark.parametrize("change", ["extra_weights", "extra_folder", "shard_in_place"])
def test_output_changes_are_noticed(change: str, models: dict[str, Path], tmp_path: Path) -> None:
    recipe = linear(tmp_path, models["base"], models["math"])
    out = tmp_path / "out"
    fusekit.merge(recipe, out, random_seed=1, out_shard_size=20_000)
    verify_output(out)
    shard = out / "model-00002-of-00008.safetensors"
    if change == "extra_weights":
        shutil.copy(shard, out / "model-extra.safetensors")
        culprit = "model-extra.safetensors was added"
    elif change == "extra_folder":
        (out / "adapter").mkdir()
        culprit = "adapter was added"
    else:
        locked_digest = sha(shard)
        _edit_in_place(shard)
        _poison_cache(shard, locked_digest)
        culprit = "model-00002-of-00008.safetensors is missing or was modified"
        # the everyday up-to-date check trusts the (poisoned) cache; --locked re-hashes
        assert fusekit.merge(recipe, out, out_shard_size=20_000).up_to_date
    with pytest.raises(OutputExistsError, match=culprit):
        fusekit.merge(recipe, out, locked=True, out_shard_size=20_000)
    with pytest.raises(FusekitError, match=culprit):
        verify_output(out)  # what push runs first


def test_seal_output_marks_and_protects_other_outputs(tmp_path: Path) -> None:
    folder = tmp_path / "moe"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(b"w" * 100)
    seal_output(folder, kind="moe", recipe_text="x: 1\n", recipe_name="moe.yaml")
    lock = read_lock(folder / LOCK_FILE)
    assert lock["kind"] == "moe" and lock["outputs"]["model.safetensors"] == {
        "size": 100, "sha256": hashlib.sha256(b"w" * 100).hexdigest()}
    verify_output(folder)
    (folder / "config.json").write_text("{ }")
    with pytest.raises(FusekitError, match="config.json is missing or was modified"):
        verify_output(folder)


def test_verify_output_without_a_lock_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(LockMismatchError, match="lock file not found"):
        verify_output(tmp_path)
