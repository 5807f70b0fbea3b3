"""Signals at any moment, and a CLI start that imports nothing heavy (issue 15, item 9).

Ctrl-C while the CLI is still importing (typer, or torch for ``merge``) exits 130 with one line; a
second SIGTERM during the cleanup the first one started exits 143 with no traceback and leaves
nothing; with ``--resume`` the interrupted run names the partial folder it kept. ``--help`` and
``--version`` import no torch (``--version`` not even typer).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_recipe

from fusekit.io.writer import partial_folders

SHARD = 20_000  # the tiny models give 8 shards

# Sends SIGINT to itself the moment ``target`` starts to be imported, then runs the CLI: an
# interrupt that lands during start-up imports, every time.
TRIP_DRIVER = """
import importlib.abc, os, signal, sys
target = sys.argv[1]

class Trip(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, module=None):
        if name == target:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)
        return None

assert target not in sys.modules
sys.meta_path.insert(0, Trip())
from fusekit.cli import main
main(sys.argv[2:])
"""

# Runs the CLI several times in one process and reports the heavy packages each run imported.
IMPORT_DRIVER = """
import json, sys
from fusekit.cli import main
seen = {}
for args in json.loads(sys.argv[1]):
    try:
        main(args)
    except SystemExit as stop:
        assert stop.code == 0, (args, stop.code)
    heavy = ("torch", "transformers", "safetensors", "numpy", "huggingface_hub", "typer")
    seen[" ".join(args)] = sorted(name for name in heavy if name in sys.modules)
print(json.dumps(seen))
"""


def _default_sigint() -> None:
    # A shell without job control starts background jobs with SIGINT ignored, and Python then keeps
    # ignoring it; give the child the default disposition, as a terminal would.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSEKIT_")}
    env.update(extra)
    return env


def _recipe(folder: Path, models: dict[str, Path]) -> Path:
    return write_recipe(folder / "recipe.yaml", "merge_method: linear\nmodels:\n"
                        f"  - model: {models['math']}\n    parameters: {{weight: 0.3}}\n"
                        f"  - model: {models['code']}\n    parameters: {{weight: 0.7}}\n")


@pytest.mark.parametrize("target", ["typer", "torch"])
def test_ctrl_c_during_start_up_imports_is_one_line(target: str, tiny_models: dict[str, Path],
                                                    tmp_path: Path) -> None:
    recipe = _recipe(tmp_path, tiny_models)
    proc = subprocess.run([sys.executable, "-c", TRIP_DRIVER, target, "merge", str(recipe),
                           str(tmp_path / "out")], env=_env(), capture_output=True, text=True,
                          timeout=300, preexec_fn=_default_sigint)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip().splitlines() == ["fusekit: interrupted; no output was left behind"]
    assert not (tmp_path / "out").exists()


def _start_slow_merge(tmp_path: Path, models: dict[str, Path], *extra: str) -> subprocess.Popen[str]:
    """A merge that writes one tensor every 0.3 s; returns once its partial folder exists."""
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "fusekit", "merge", str(_recipe(tmp_path, models)),
                             str(out), "--out-shard-size", str(SHARD), *extra],
                            env=_env(FUSEKIT_TEST_WRITE_DELAY="0.3"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=_default_sigint)
    deadline = time.monotonic() + 120
    while not partial_folders(out):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the merge never started writing: {proc.communicate()}")
        time.sleep(0.01)
    time.sleep(0.2)  # inside the writing loop
    assert proc.poll() is None, "the merge finished before it could be interrupted"
    return proc


def test_second_sigterm_during_cleanup_exits_143_cleanly(tiny_models: dict[str, Path],
                                                         tmp_path: Path) -> None:
    proc = _start_slow_merge(tmp_path, tiny_models)
    try:
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.1)  # the cleanup waits for the writer's 0.3 s write: the next one lands in it
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert stderr.strip().splitlines()[-1:] == ["fusekit: interrupted; no output was left behind"]
    assert partial_folders(tmp_path / "out") == [] and not (tmp_path / "out").exists()


def test_interrupt_with_resume_names_the_kept_partial_folder(tiny_models: dict[str, Path],
                                                              tmp_path: Path) -> None:
    proc = _start_slow_merge(tmp_path, tiny_models, "--resume")
    try:
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    kept = partial_folders(tmp_path / "out")
    assert len(kept) == 1, kept
    assert "no output was left behind" not in stderr and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        f"fusekit: interrupted; the partial output is kept in {kept[0]}; run the same command with "
        "--resume to continue it")


def test_help_and_version_import_no_torch() -> None:
    import json

    runs = [["--version"], ["--help"], *([name, "--help"] for name in
                                        ("merge", "plan", "push", "moe", "score", "ensemble", "route"))]
    proc = subprocess.run([sys.executable, "-c", IMPORT_DRIVER, json.dumps(runs)], env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen["--version"] == [], "--version is answered before typer or torch is imported"
    for args, heavy in seen.items():
        assert "torch" not in heavy and "transformers" not in heavy, (args, heavy)
