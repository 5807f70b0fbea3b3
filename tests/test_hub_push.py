"""``fusekit push`` and ``merge --push-to-hub`` against a fake Hub on 127.0.0.1 (see fake_hub.py).

The real CLI runs in a subprocess with ``HF_ENDPOINT`` pointing at the fake server, so every call
goes through huggingface_hub's own HTTP code (LFS path: ``HF_HUB_DISABLE_XET=1``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import write_recipe
from fake_hub import fake_hub

import fusekit

TOKEN = "hf_fusekitTestToken0123456789abcdef"


def _recipe(folder: Path, models: dict[str, Path]) -> Path:
    return write_recipe(folder / "recipe.yaml", "merge_method: linear\nmodels:\n"
                        f"  - model: {models['base']}\n    parameters: {{weight: 0.4}}\n"
                        f"  - model: {models['math']}\n    parameters: {{weight: 0.6}}\n")


def _env(url: str, tmp_path: Path, token: str = TOKEN) -> dict[str, str]:
    return {"HF_ENDPOINT": url, "HF_TOKEN": token, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf-home"), "FUSEKIT_HUB_RETRY_DELAY": "0.05",
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def _assert_no_token(tmp_path: Path, *texts: str) -> None:
    for text in texts:
        assert TOKEN not in text
    for path in tmp_path.rglob("*"):
        if path.is_file() and "hf-home" not in path.parts:
            assert TOKEN.encode() not in path.read_bytes(), path


@pytest.fixture(scope="module")
def merged(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pushsrc")
    fusekit.merge(_recipe(folder, tiny_models), folder / "out", out_shard_size=20_000, random_seed=1)
    return folder / "out"


def test_push_uploads_every_file(merged: Path, tmp_path: Path,
                                 run_cli: Callable[..., object]) -> None:
    with fake_hub(TOKEN) as (url, hub):
        proc = run_cli("push", merged, "my-org/merge", "--private", "--revision", "dev",
                       "--commit-message", "first upload", "--format", "json",
                       env=_env(url, tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    result = json.loads(proc.stdout)  # type: ignore[attr-defined]
    assert result["repo_id"] == "my-org/merge" and result["revision"] == "dev"
    assert hub.repos["my-org/merge"]["private"] is True
    assert "dev" in hub.repos["my-org/merge"]["branches"]
    uploaded = hub.files[("my-org/merge", "dev")]
    local = {p.name: p.read_bytes() for p in merged.iterdir() if p.is_file()}
    assert uploaded == local  # every file, byte for byte, shards through LFS
    assert "fusekit.lock" in uploaded and len([n for n in uploaded if n.endswith(".safetensors")]) > 1
    assert hub.lfs, "shards must go through the LFS endpoints"
    assert any(f"Bearer {TOKEN}" in h for h in hub.headers_seen)
    _assert_no_token(tmp_path, proc.stdout, proc.stderr)  # type: ignore[attr-defined]


def test_merge_push_retries_transient_5xx(tiny_models: dict[str, Path], tmp_path: Path,
                                          run_cli: Callable[..., object]) -> None:
    recipe = _recipe(tmp_path, tiny_models)
    with fake_hub(TOKEN) as (url, hub):
        hub.fail["/api/repos/create"] = [503]
        hub.fail["/commit/"] = [502]
        proc = run_cli("merge", recipe, tmp_path / "out", "--random-seed", "3", "--push-to-hub",
                       "my-org/merged", env=_env(url, tmp_path), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
    creates = [r for r in hub.requests if r[1] == "/api/repos/create"]
    commits = [r for r in hub.requests if "/commit/" in r[1]]
    assert len(creates) >= 2 and len(commits) >= 2  # failed once, then succeeded
    assert "retrying" in proc.stderr  # type: ignore[attr-defined]
    uploaded = hub.files[("my-org/merged", "main")]
    assert uploaded["model.safetensors"] == (tmp_path / "out" / "model.safetensors").read_bytes()
    assert "pushed" in proc.stdout  # type: ignore[attr-defined]
    _assert_no_token(tmp_path, proc.stdout, proc.stderr)  # type: ignore[attr-defined]


def test_push_with_a_refused_token_is_one_line(merged: Path, tmp_path: Path,
                                               run_cli: Callable[..., object]) -> None:
    with fake_hub(TOKEN) as (url, hub):
        proc = run_cli("push", merged, "my-org/merge", env=_env(url, tmp_path, token="hf_wrong_" + TOKEN[9:]),
                       cwd=tmp_path)
    stderr = proc.stderr  # type: ignore[attr-defined]
    assert proc.returncode == 2, stderr  # type: ignore[attr-defined]
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "401" in lines[0] and "my-org/merge" in lines[0], stderr
    assert "Traceback" not in stderr and "hf_wrong_" not in stderr
    assert not hub.files and hub.requests  # the server was asked, and nothing was stored


def test_push_refuses_a_modified_output(merged: Path, tmp_path: Path) -> None:
    from fusekit.errors import FusekitError
    from fusekit.io.hub import push_to_hub

    copy = tmp_path / "copy"
    copy.mkdir()
    for path in merged.iterdir():
        copy.joinpath(path.name).write_bytes(path.read_bytes())
    shard = sorted(copy.glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(FusekitError, match=shard.name):
        push_to_hub(copy, "my-org/merge")
    with pytest.raises(FusekitError, match="not a Hub repository id"):
        push_to_hub(merged, "../etc")


def test_pushing_an_unchanged_output_makes_no_commit(merged: Path, tmp_path: Path,
                                                     run_cli: Callable[..., object]) -> None:
    """A second push of the same files compares sha256 (LFS files) and git blob ids (the others) with
    the branch and commits nothing; a file that differs on the Hub is committed again."""
    with fake_hub(TOKEN) as (url, hub):
        first = run_cli("push", merged, "my-org/merge", env=_env(url, tmp_path), cwd=tmp_path)
        assert first.returncode == 0 and hub.commits == 1, first.stderr  # type: ignore[attr-defined]
        before = len(hub.requests)
        again = run_cli("push", merged, "my-org/merge", env=_env(url, tmp_path), cwd=tmp_path)
        assert again.returncode == 0, again.stderr  # type: ignore[attr-defined]
        assert again.stdout.startswith("up to date: no commit")  # type: ignore[attr-defined]
        later = [path for _, path in hub.requests[before:]]
        assert hub.commits == 1
        assert not any("/commit/" in p or "/lfs/" in p or "preupload" in p for p in later)
        assert any("/paths-info/" in p for p in later)
        uploaded = hub.files[("my-org/merge", "main")]
        for name, changed in (("README.md", b"edited on the Hub"), (sorted(
                n for n in uploaded if n.endswith(".safetensors"))[0], b"\0" * 8)):
            uploaded[name] = changed  # one regular file, then one LFS file, differs on the Hub
            proc = run_cli("push", merged, "my-org/merge", "--json", env=_env(url, tmp_path), cwd=tmp_path)
            assert proc.returncode == 0, proc.stderr  # type: ignore[attr-defined]
            result = json.loads(proc.stdout)  # type: ignore[attr-defined]
            assert result["up_to_date"] is False and result["commit_url"]
            assert uploaded[name] == (merged / name).read_bytes()
        assert hub.commits == 3
        proc = run_cli("push", merged, "my-org/merge", "--json", env=_env(url, tmp_path), cwd=tmp_path)
        result = json.loads(proc.stdout)  # type: ignore[attr-defined]
        assert result["up_to_date"] is True and result["commit_url"] is None and hub.commits == 3
