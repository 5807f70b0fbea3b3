"""Output rules: an output never holds an input, --overwrite replaces only fusekit outputs, and one
run at a time writes an output (issue 15, items 1 and 2)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import write_recipe

import fusekit
from fusekit.errors import CheckpointError, OutputBusyError, OutputExistsError, OutputPathError
from fusekit.io.lock import LOCK_FILE
from fusekit.io.outputs import check_out_file, claim_output, lock_path, output_lock
from fusekit.io.writer import ShardWriter, check_output_location, partial_folders


def tree_digest(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path (the before/after evidence)."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def work(tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder (the current folder) with private model copies and a recipe naming them."""
    root = tmp_path / "work"
    for name in ("base", "math"):
        shutil.copytree(tiny_models[name], root / "models" / name)
    write_recipe(root / "recipe.yaml", "merge_method: linear\nmodels:\n"
                 "  - model: models/base\n    parameters: {weight: 0.5}\n"
                 "  - model: models/math\n    parameters: {weight: 0.5}\n")
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize("out", ["models/base", "models", "models/base/sub", ".", "", "./", "..",
                                 "recipe.yaml"])
@pytest.mark.parametrize("flag", [{}, {"overwrite": True}, {"force": True}])
def test_output_onto_inputs_is_refused_and_every_input_byte_stays(out: str, flag: dict[str, bool],
                                                                   work: Path) -> None:
    before = tree_digest(work)
    with pytest.raises((OutputPathError, OutputExistsError)) as caught:
        fusekit.merge("recipe.yaml", out, random_seed=1, **flag)
    assert "\n" not in str(caught.value)
    assert tree_digest(work) == before
    assert not list(work.glob(".*fusekit*")) and not list(work.parent.glob(".*fusekit*"))


@pytest.mark.parametrize("out", ["models/math", ".", ""])
def test_cli_overwrite_onto_an_input_exits_2_with_one_line(out: str, work: Path,
                                                           run_cli: Callable[..., Any]) -> None:
    before = tree_digest(work)
    proc = run_cli("merge", "recipe.yaml", out, "--overwrite", cwd=work)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "fusekit never replaces" in lines[0] or "input model 'models/math'" in lines[0], lines[0]
    assert tree_digest(work) == before


@pytest.mark.parametrize(("path", "why"), [("/", "root"), ("~", "'~' was not expanded"),
                                           ("~/x", "'~' was not expanded"), ("HOME", "home folder"),
                                           (".", "current folder"), ("..", "holds the current"),
                                           ("y" * 300, "longer than 200 bytes"),
                                           ("y" * 256 + "/sub", "File name too long")])
def test_unsafe_locations_are_refused(path: str, why: str, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    home, project = tmp_path / "home", tmp_path / "src" / "project"
    home.mkdir()
    project.mkdir(parents=True)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(project)
    with pytest.raises(OutputPathError, match=why):
        check_output_location(str(home) if path == "HOME" else path)
    assert check_output_location("new-folder") == project.resolve() / "new-folder"
    assert check_output_location(home / "merged") == home.resolve() / "merged"


def test_overwrite_replaces_only_an_empty_folder_or_a_fusekit_output(work: Path) -> None:
    mine = work / "out"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    (mine / "photo.jpg").write_bytes(b"\xff")
    with pytest.raises(OutputExistsError, match=r"holds 2 entries \(notes.txt, photo.jpg\) but no "
                                                "fusekit.lock"):
        fusekit.merge("recipe.yaml", mine, overwrite=True)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "photo.jpg"]
    empty = work / "empty"
    empty.mkdir()
    fusekit.merge("recipe.yaml", empty, overwrite=True)
    first = empty.stat().st_ino
    fusekit.merge("recipe.yaml", empty, force=True)  # a fusekit output: replaced (a new folder)
    assert empty.stat().st_ino != first and (empty / LOCK_FILE).is_file()
    assert not lock_path(empty).exists()


def test_a_second_writer_refuses_at_once(work: Path) -> None:
    with output_lock(work / "out"):
        started = time.perf_counter()
        with pytest.raises(OutputBusyError, match=rf"pid {os.getpid()}"):
            fusekit.merge("recipe.yaml", work / "out", random_seed=1)
        with pytest.raises(OutputBusyError), claim_output(work / "out/../out"):
            pass
        assert time.perf_counter() - started < 30
    assert not (work / "out").exists()
    fusekit.merge("recipe.yaml", work / "out", random_seed=1)  # released: the next run goes ahead


def test_two_processes_one_output_and_the_kernel_releases_a_dead_holder(work: Path) -> None:
    """Another process writing OUT_DIR (here: a merge slowed down) makes a second merge refuse; once
    that process is killed with SIGKILL the lock is free again."""
    env = {**os.environ, "FUSEKIT_TEST_WRITE_DELAY": "0.5"}
    env.pop("FUSEKIT_DEBUG", None)
    proc = subprocess.Popen([sys.executable, "-m", "fusekit", "merge", "recipe.yaml", "out", "-q",
                             "--random-seed", "3"], cwd=work, env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not partial_folders(work / "out"):
            assert proc.poll() is None and time.monotonic() < deadline, "the merge ended too soon"
            time.sleep(0.02)
        with pytest.raises(OutputBusyError, match=rf"pid {proc.pid}"):
            fusekit.merge("recipe.yaml", "out", random_seed=4)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = fusekit.merge("recipe.yaml", "out", random_seed=4)
    assert not result.up_to_date and result.stats.tensors and (work / "out" / LOCK_FILE).is_file()


def test_a_finished_output_is_not_replaced_by_another_recipe(work: Path) -> None:
    fusekit.merge("recipe.yaml", "out", random_seed=1)
    kept = tree_digest(work / "out")
    other = write_recipe(work / "other.yaml", (work / "recipe.yaml").read_text().replace("0.5", "0.25"))
    with pytest.raises(OutputExistsError, match="out of date"):
        fusekit.merge(other, "out", random_seed=1)
    assert tree_digest(work / "out") == kept


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_an_input_removed_mid_merge_is_one_line_and_leaves_nothing(damage: str, work: Path,
                                                                   monkeypatch: pytest.MonkeyPatch
                                                                   ) -> None:
    """The math model disappears (or is truncated) after the first tensor is written."""
    original = ShardWriter.write
    victim = work / "models" / "math"

    def write(self: ShardWriter, name: str, tensor: Any, *, first_row: int = 0) -> None:
        if victim.exists():
            if damage == "delete":
                shutil.rmtree(victim)
            else:
                with (victim / "model.safetensors").open("r+b") as handle:
                    handle.truncate(1000)
        original(self, name, tensor, first_row=first_row)

    monkeypatch.setattr(ShardWriter, "write", write)
    with pytest.raises(CheckpointError) as caught:
        fusekit.merge("recipe.yaml", "out", random_seed=1, pipelined=False)
    assert "\n" not in str(caught.value) and "models/math" in str(caught.value)
    assert not (work / "out").exists() and partial_folders(work / "out") == []


def test_check_out_file(work: Path) -> None:
    assert check_out_file("answers.jsonl") == Path("answers.jsonl")
    with pytest.raises(OutputPathError, match="is a folder"):
        check_out_file("models")
    with pytest.raises(OutputPathError, match="is a folder"):
        check_out_file(".")
    with pytest.raises(OutputPathError, match="give the path of a file"):
        check_out_file("")
    with pytest.raises(OutputPathError, match="not a regular file"):
        check_out_file("/dev/null")
    with pytest.raises(OutputPathError, match="does not exist"):
        check_out_file("nowhere/answers.jsonl")
    with pytest.raises(OutputPathError, match="is the input the prompts"):
        check_out_file("./p.jsonl", inputs=[("the prompts", work / "p.jsonl")])
