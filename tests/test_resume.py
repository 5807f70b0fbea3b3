"""--resume: an interrupted merge continues from its hash-verified shards, byte-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_recipe

import fusekit
from fusekit.io.journal import JOURNAL_FILE, read_journal
from fusekit.io.writer import ShardWriter, partial_folders

SHARD = 20_000  # the tiny models give 8 shards


def recipe_for(folder: Path, models: dict[str, Path], method: str = "linear") -> Path:
    if method == "linear":
        body = (f"models:\n  - model: {models['math']}\n    parameters: {{weight: 0.3}}\n"
                f"  - model: {models['code']}\n    parameters: {{weight: 0.7}}\n")
    else:
        body = (f"base_model: {models['base']}\nmodels:\n"
                f"  - model: {models['math']}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
                f"  - model: {models['code']}\n    parameters: {{weight: 0.5, density: 0.5}}\n")
    return write_recipe(folder / f"{method}.yaml", f"merge_method: {method}\n{body}")


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def interrupt_after(monkeypatch: pytest.MonkeyPatch, writes: int) -> None:
    """Make the writer raise KeyboardInterrupt (as Ctrl-C would) after ``writes`` tensors."""
    original = ShardWriter.write
    count = [0]

    def write(self: ShardWriter, name: str, tensor: object, *, first_row: int = 0) -> None:
        count[0] += 1
        if count[0] > writes:
            raise KeyboardInterrupt
        original(self, name, tensor, first_row=first_row)  # type: ignore[arg-type]

    monkeypatch.setattr(ShardWriter, "write", write)


@pytest.mark.parametrize("method", ["linear", "dare_linear"])
def test_resume_after_interrupt_is_byte_identical(method: str, tiny_models: dict[str, Path],
                                                  tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_for(tmp_path, tiny_models, method)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 12)
        with pytest.raises(KeyboardInterrupt):
            fusekit.merge(recipe, tmp_path / "b" / "out", out_shard_size=SHARD, resume=True,
                          pipelined=False)
    (partial,) = partial_folders(tmp_path / "b" / "out")
    journal = read_journal(partial)
    assert journal is not None and len(journal[1]) >= 2 and not (tmp_path / "b" / "out").exists()
    seed = journal[0]["seed"]  # picked by the first run; the resumed run must reuse it
    # a journaled shard that was changed on disk is not trusted, but recomputed
    first = partial / sorted(journal[1])[0]
    data = bytearray(first.read_bytes())
    data[-1] ^= 1
    first.write_bytes(bytes(data))
    resumed = fusekit.merge(recipe, tmp_path / "b" / "out", out_shard_size=SHARD, resume=True)
    assert resumed.seed == (None if method == "linear" else seed)  # a deterministic merge records none
    assert resumed.kept_shards == len(journal[1]) - 1
    whole = fusekit.merge(recipe, tmp_path / "a" / "out", out_shard_size=SHARD, random_seed=seed)
    assert whole.kept_shards == 0
    assert files(tmp_path / "a" / "out") == files(tmp_path / "b" / "out")
    assert JOURNAL_FILE not in files(tmp_path / "b" / "out")
    assert partial_folders(tmp_path / "b" / "out") == []


def test_interrupt_without_resume_leaves_nothing(tiny_models: dict[str, Path], tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_for(tmp_path, tiny_models)
    interrupt_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        fusekit.merge(recipe, tmp_path / "out", out_shard_size=SHARD, pipelined=False)
    assert list(tmp_path.iterdir()) == [recipe]


def test_resume_of_a_different_recipe_starts_over(tiny_models: dict[str, Path], tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = recipe_for(tmp_path, tiny_models)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 12)
        with pytest.raises(KeyboardInterrupt):
            fusekit.merge(recipe, tmp_path / "out", out_shard_size=SHARD, resume=True, pipelined=False)
    other = write_recipe(tmp_path / "other.yaml", recipe.read_text().replace("0.3", "0.4"))
    result = fusekit.merge(other, tmp_path / "out", out_shard_size=SHARD, resume=True, random_seed=1)
    assert result.kept_shards == 0 and partial_folders(tmp_path / "out") == []


def test_sigkill_then_resume_via_cli(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    """A real process killed with SIGKILL part way; ``--resume`` finishes it byte-identically."""
    recipe = recipe_for(tmp_path, tiny_models)
    args = [sys.executable, "-m", "fusekit", "merge", str(recipe), "--out-shard-size", str(SHARD),
            "--random-seed", "9", "-q"]
    env = {**os.environ, "FUSEKIT_TEST_WRITE_DELAY": "0.15"}
    env.pop("FUSEKIT_DEBUG", None)
    out = tmp_path / "b" / "out"
    proc = subprocess.Popen([*args, str(out), "--resume"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while True:
            partial = partial_folders(out)
            journal = read_journal(partial[0]) if partial else None
            if journal is not None and len(journal[1]) >= 2:
                break
            assert proc.poll() is None, "the merge ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not out.exists()  # the killed run left only its hidden partial folder
    clean = {k: v for k, v in env.items() if k != "FUSEKIT_TEST_WRITE_DELAY"}
    done = subprocess.run([*args, str(out), "--resume", "--format", "json"], env=clean,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"kept_shards": ' in done.stdout and '"kept_shards": 0' not in done.stdout
    assert "resuming from" in done.stderr
    whole = subprocess.run([*args, str(tmp_path / "a" / "out")], env=clean, capture_output=True,
                           text=True, timeout=120)
    assert whole.returncode == 0, whole.stderr
    assert files(tmp_path / "a" / "out") == files(out)
    assert partial_folders(out) == []


def test_resume_checks_inputs_by_content(tiny_models: dict[str, Path], tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """An input edited in place with its size and mtime restored: no shard of the old run is kept,
    and the output is what the edited inputs give."""
    import shutil

    models = {}
    for name in ("math", "code"):
        models[name] = tmp_path / "models" / name
        shutil.copytree(tiny_models[name], models[name])
    recipe = recipe_for(tmp_path, models)
    with monkeypatch.context() as patch:
        interrupt_after(patch, 12)
        with pytest.raises(KeyboardInterrupt):
            fusekit.merge(recipe, tmp_path / "b" / "out", out_shard_size=SHARD, resume=True,
                          pipelined=False, random_seed=5)
    (partial,) = partial_folders(tmp_path / "b" / "out")
    journal = read_journal(partial)
    assert journal is not None and len(journal[1]) >= 2 and "inputs" in journal[0]
    weights = models["code"] / "model.safetensors"
    info = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-4] ^= 0x40  # the last float of the last tensor changes
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(info.st_atime_ns, info.st_mtime_ns))
    resumed = fusekit.merge(recipe, tmp_path / "b" / "out", out_shard_size=SHARD, resume=True,
                            random_seed=5)
    assert resumed.kept_shards == 0
    whole = fusekit.merge(recipe, tmp_path / "a" / "out", out_shard_size=SHARD, random_seed=5)
    assert files(tmp_path / "a" / "out") == files(tmp_path / "b" / "out")
    assert whole.kept_shards == 0 and partial_folders(tmp_path / "b" / "out") == []
