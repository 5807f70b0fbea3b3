"""Progress bars: drawn on stderr under a terminal, never without one, with ``CI`` set or ``--quiet``.

Commands run under a pseudo-terminal (``pty``) so that stderr is a real tty, as at a keyboard.
"""

from __future__ import annotations

import fcntl
import os
import pty
import select
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from fusekit import progress
from fusekit.demo import build_demo_models

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="pseudo-terminals are POSIX")

SNIPPET = ("from fusekit.progress import bar, steps\n"
           "for _ in bar(range(3), desc='labelling 3 examples'): pass\n"
           "with steps('training the router', total=2, unit='step') as advance: advance(2)\n")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env.update(extra)
    return env


def run_with_tty_stderr(args: list[str], env: dict[str, str], timeout: float = 120,
                        size: tuple[int, int] = (30, 100)) -> tuple[int, str, str]:
    """Run ``args`` with stderr on a pseudo-terminal of ``size`` (rows, columns; (0, 0): never
    sized); (exit code, stdout, everything stderr got)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=follower, env=env)
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        ready, _, _ = select.select([leader], [], [], timeout)
        if not ready:
            proc.kill()
            raise AssertionError(f"{args} wrote nothing for {timeout} s")
        try:
            data = os.read(leader, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(leader)
    stdout = proc.stdout.read().decode() if proc.stdout else ""
    return proc.wait(timeout=timeout), stdout, b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("size", [(30, 100), (0, 0)])
def test_a_terminal_sees_the_bars(size: tuple[int, int]) -> None:
    code, _, err = run_with_tty_stderr([sys.executable, "-c", SNIPPET], _env(), size=size)
    assert code == 0
    assert "labelling 3 examples:" in err and "0/3" in err
    assert "training the router:" in err and "step/s" in err


@pytest.mark.parametrize("env", [{"CI": "1"}, {"CI": "true"}])
def test_ci_turns_the_bars_off(env: dict[str, str]) -> None:
    code, _, err = run_with_tty_stderr([sys.executable, "-c", SNIPPET], _env(**env))
    assert code == 0 and err == ""


def test_no_terminal_no_bars() -> None:
    proc = subprocess.run([sys.executable, "-c", SNIPPET], capture_output=True, text=True, env=_env(),
                          timeout=120)
    assert proc.returncode == 0 and proc.stderr == ""


def test_set_quiet_turns_them_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    try:
        assert progress.enabled()
        progress.set_quiet(True)
        assert not progress.enabled()
        with progress.steps("x", total=1) as advance:
            advance(1)  # a no-op, not an error
        assert list(progress.bar([1, 2], desc="x")) == [1, 2]
    finally:
        progress.set_quiet(False)
    monkeypatch.setenv("CI", "1")
    assert not progress.enabled()


@pytest.fixture(scope="module")
def scoring_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("progress")
    model = build_demo_models(root, names=("m",), hidden_size=32, num_layers=2, num_attention_heads=4,
                              num_key_value_heads=2)["m"]
    text = root / "t.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 40, encoding="utf-8")
    return model, text


def test_score_under_a_terminal_shows_its_bar_and_quiet_hides_it(scoring_inputs: tuple[Path, Path]) -> None:
    model, text = scoring_inputs
    command = [sys.executable, "-m", "fusekit", "score", str(model), "--text", str(text), "--context", "64"]
    code, out, err = run_with_tty_stderr(command, _env())
    assert code == 0 and "bits/byte" in out
    assert "scoring t.txt with m:" in err and "tok/s" in err  # the bar, with its unit
    code, out, err = run_with_tty_stderr([*command, "--quiet"], _env())
    assert code == 0 and "bits/byte" in out and "scoring" not in err
