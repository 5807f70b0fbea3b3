"""Hub ids resolved from a huggingface_hub cache offline, and pickle checkpoints (refused by default).

The fake cache has the layout huggingface_hub itself writes::

    $HF_HOME/hub/models--org--name/
        blobs/<sha256>                      the file contents
        refs/main                           the commit of the main branch
        snapshots/<commit>/<file>           symlinks to ../../blobs/<sha256>

huggingface_hub reads ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` into module constants when it is first
imported, so the in-process tests patch those constants as well as the environment; the end-to-end
test runs the real CLI in a fresh process with the environment alone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from conftest import load_weights, write_recipe
from safetensors.torch import load_file

import fusekit
from fusekit.errors import CheckpointError, CheckpointNotFoundError
from fusekit.io.refs import resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"
F32 = {"rtol": 1e-5, "atol": 1e-6}


def add_to_cache(cache: Path, repo_id: str, source: Path, commit: str, *,
                 branch: str | None = "main") -> Path:
    """Put every file of ``source`` into the cache as huggingface_hub lays it out; return the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    for file in sorted(source.iterdir()):
        if not file.is_file():
            continue
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / file.name)
    if branch is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / branch).write_text(commit)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty offline cache under a temporary HF_HOME, for this process and its children."""
    import huggingface_hub.constants as constants

    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    for name, value in {"HF_HOME": home, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # so that "org/name" is not a local folder by accident
    return cache


def hub_env(cache: Path) -> dict[str, str]:
    return {"HF_HOME": str(cache.parent), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


# -- Hub ids -----------------------------------------------------------------------------------------


def test_hub_id_resolves_to_cached_snapshot(hub_cache: Path, tiny_models: dict[str, Path]) -> None:
    snapshot = add_to_cache(hub_cache, "org/name", tiny_models["math"], COMMIT)
    resolved = resolve_model("org/name")
    assert Path(resolved.folder).resolve() == snapshot.resolve()
    assert resolved.revision == COMMIT
    assert resolved.hub_id == "org/name"
    assert resolved.ref == "org/name"
    assert [f.name for f in resolved.weight_files] == ["model.safetensors"]
    assert resolved.config_path.is_file()


def test_hub_id_with_commit_revision(hub_cache: Path, tiny_models: dict[str, Path]) -> None:
    add_to_cache(hub_cache, "org/name", tiny_models["math"], COMMIT)
    older = add_to_cache(hub_cache, "org/name", tiny_models["code"], OTHER_COMMIT, branch=None)
    resolved = resolve_model(f"org/name@{OTHER_COMMIT}")
    assert resolved.revision == OTHER_COMMIT
    assert Path(resolved.folder).resolve() == older.resolve()
    assert resolved.hub_id == "org/name"
    # and the default branch still resolves to the commit refs/main names
    assert resolve_model("org/name").revision == COMMIT


def test_hub_id_with_branch_revision(hub_cache: Path, tiny_models: dict[str, Path]) -> None:
    add_to_cache(hub_cache, "org/name", tiny_models["math"], COMMIT, branch="v1")
    resolved = resolve_model("org/name@v1")
    assert resolved.revision == COMMIT


def test_uncached_hub_id_is_a_clear_offline_error(hub_cache: Path, tiny_models: dict[str, Path]) -> None:
    add_to_cache(hub_cache, "org/name", tiny_models["math"], COMMIT)
    with pytest.raises(CheckpointNotFoundError, match="offline") as caught:
        resolve_model("org/missing")
    assert "org/missing" in str(caught.value)
    with pytest.raises(CheckpointNotFoundError, match="offline"):
        resolve_model(f"org/name@{OTHER_COMMIT}")  # a commit that is not cached


def test_sharded_hub_snapshot_with_symlinked_blobs_resolves(hub_cache: Path,
                                                            sharded_models: dict[str, Path]) -> None:
    # huggingface_hub stores every snapshot file as a symlink into ../../blobs, so shards named by the
    # index resolve to paths outside the snapshot folder; that is the normal layout, not an attack
    snapshot = add_to_cache(hub_cache, "org/sharded", sharded_models["base"], COMMIT)
    assert (snapshot / "model.safetensors.index.json").is_symlink()
    resolved = resolve_model("org/sharded")
    assert resolved.revision == COMMIT
    index = json.loads((sharded_models["base"] / "model.safetensors.index.json").read_text())
    assert sorted({Path(f).name for f in resolved.weight_files}) == sorted(set(index["weight_map"].values()))


def test_merge_with_hub_ids_offline_through_the_cli(
        tmp_path: Path, tiny_models: dict[str, Path],
        run_cli: Callable[..., object]) -> None:
    cache = tmp_path / "hf-home" / "hub"
    add_to_cache(cache, "org/base", tiny_models["base"], COMMIT)
    add_to_cache(cache, "org/math", tiny_models["math"], OTHER_COMMIT)
    recipe_text = ("merge_method: task_arithmetic\nbase_model: org/base\nmodels:\n"
                   "  - model: org/math\n    parameters: {weight: 0.6}\n"
                   f"  - model: {tiny_models['code']}\n    parameters: {{weight: 0.4}}\n"
                   "parameters: {lambda: 0.9}\n")
    recipe = write_recipe(tmp_path / "r.yaml", recipe_text)
    result = run_cli("merge", recipe, tmp_path / "out", "--quiet", cwd=tmp_path, env=hub_env(cache))
    assert result.returncode == 0, result.stderr
    base, math_, code = (load_weights(tiny_models[n]) for n in ("base", "math", "code"))
    merged = load_weights(tmp_path / "out")
    assert sorted(merged) == sorted(base)
    for name, b in base.items():
        b64 = b.double()
        expected = b64 + 0.9 * (0.6 * (math_[name].double() - b64) + 0.4 * (code[name].double() - b64))
        torch.testing.assert_close(merged[name].double(), expected, **F32, msg=name)
    card = (tmp_path / "out" / "README.md").read_text()
    front = yaml.safe_load(re.match(r"\A---\n(.*?)\n---\n", card, re.DOTALL).group(1))
    assert sorted(front["base_model"]) == ["org/base", "org/math"]
    assert (tmp_path / "out" / "mergekit_config.yml").read_text() == recipe_text


def test_uncached_hub_id_fails_cleanly_through_the_cli(tmp_path: Path, tiny_models: dict[str, Path],
                                                       run_cli: Callable[..., object]) -> None:
    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          "  - model: org/nowhere\n    parameters: {weight: 1}\n"
                          f"  - model: {tiny_models['code']}\n    parameters: {{weight: 1}}\n")
    result = run_cli("merge", recipe, tmp_path / "out", "--quiet", cwd=tmp_path, env=hub_env(cache))
    assert result.returncode == 2
    assert "org/nowhere" in result.stderr and "offline" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# -- pickle checkpoints ------------------------------------------------------------------------------


@pytest.fixture
def pickle_model(tmp_path: Path, tiny_models: dict[str, Path]) -> Path:
    """The tiny "math" model saved as pytorch_model.bin beside its config."""
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tiny_models["math"] / "config.json", folder / "config.json")
    torch.save(load_file(tiny_models["math"] / "model.safetensors"), folder / "pytorch_model.bin")
    return folder


def test_pickle_folder_is_refused_by_default(pickle_model: Path) -> None:
    with pytest.raises(CheckpointError, match="--allow-pickle") as caught:
        resolve_model(str(pickle_model))
    assert str(pickle_model) in str(caught.value)
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        resolve_model(str(pickle_model / "pytorch_model.bin"))
    resolved = resolve_model(str(pickle_model), allow_pickle=True)
    assert resolved.is_pickle


def test_pickle_merge_is_refused_then_works_when_allowed(pickle_model: Path, tiny_models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          f"  - model: {tiny_models['base']}\n    parameters: {{weight: 0.25}}\n"
                          f"  - model: {pickle_model}\n    parameters: {{weight: 0.75}}\n")
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        fusekit.merge(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    fusekit.merge(recipe, tmp_path / "out", allow_pickle=True)
    base, math_ = load_weights(tiny_models["base"]), load_weights(tiny_models["math"])
    merged = load_weights(tmp_path / "out")
    assert sorted(merged) == sorted(base)
    for name in base:
        expected = (0.25 * base[name].double() + 0.75 * math_[name].double()) / 1.0
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name].double(), expected, **F32, msg=name)


def test_pickle_only_model_as_donor(pickle_model: Path, tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "r.yaml",
                          f"merge_method: passthrough\nmodels:\n  - model: {pickle_model}\n")
    fusekit.merge(recipe, tmp_path / "out", allow_pickle=True, out_shard_size=None)
    original = torch.load(pickle_model / "pytorch_model.bin", weights_only=True)
    merged = load_weights(tmp_path / "out")
    assert sorted(merged) == sorted(original)
    assert all(torch.equal(merged[n], original[n]) for n in original)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == json.loads(
        (pickle_model / "config.json").read_text())


class _Payload:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (math.sqrt, ("not a tensor",))


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    folder = tmp_path / "evil"
    folder.mkdir()
    shutil.copy(tiny_models["math"] / "config.json", folder / "config.json")
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "extra": _Payload()},
               folder / "pytorch_model.bin")
    recipe = write_recipe(tmp_path / "r.yaml", f"merge_method: passthrough\nmodels:\n  - model: {folder}\n")
    with pytest.raises(CheckpointError, match="weights-only"):
        fusekit.merge(recipe, tmp_path / "out", allow_pickle=True)
    assert not (tmp_path / "out").exists()
