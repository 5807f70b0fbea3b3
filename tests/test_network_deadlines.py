"""Every Hub request has a deadline, and no token is ever printed (issue 15, item 3).

``fusekit push`` runs in a subprocess against servers on 127.0.0.1 that misbehave: one accepts and
never answers, one drips its headers a byte at a time (defeating read timeouts), one resets every
connection, and a fake Hub that never answers the commit call. Each must end in one error line,
exit 2, within the deadline set by ``FUSEKIT_HUB_TIMEOUT``. The deadline is measured from the
server's first request, so a slow start of the subprocess on a busy machine does not count.
"""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fake_hub import fake_hub, raw_server

TOKEN = "hf_fusekitDeadlineToken0123456789abc"
DEADLINE = 2.0  # FUSEKIT_HUB_TIMEOUT in these tests
SLACK = 4.0  # the process must be gone this long after the deadline (exit, on a loaded machine)


@pytest.fixture
def output(tmp_path: Path) -> Path:
    """A minimal finished output: config.json and one safetensors file (no lock)."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(16))
    return folder


def _env(url: str, tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FUSEKIT_", "HF_"))}
    env.update({"HF_ENDPOINT": url, "HF_TOKEN": TOKEN, "HF_HUB_DISABLE_XET": "1", "HF_HUB_OFFLINE": "0",
                "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_TELEMETRY": "1",
                "FUSEKIT_HUB_TIMEOUT": str(DEADLINE), "FUSEKIT_HUB_REQUEST_TIMEOUT": "0.5",
                "FUSEKIT_HUB_RETRY_DELAY": "0.05"})
    env.update(extra)
    return env


def _push(output: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    """Run ``fusekit push``; return the result and the time.monotonic() at which it ended."""
    proc = subprocess.run([sys.executable, "-m", "fusekit", "push", str(output), "my-org/merge"],
                          env=env, capture_output=True, text=True, timeout=120)
    return proc, time.monotonic()


def _assert_one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("fusekit: error:")]
    assert len(errors) == 1 and proc.stderr.rstrip().endswith(errors[0]), proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    return errors[0]


@pytest.mark.parametrize("behaviour", ["silent", "drip", "reset"])
def test_push_to_a_broken_server_ends_within_the_deadline(behaviour: str, output: Path,
                                                          tmp_path: Path) -> None:
    with raw_server(behaviour) as server:
        proc, ended = _push(output, _env(server.url, tmp_path))
    line = _assert_one_error_line(proc)
    assert server.first_request is not None, "the server was never asked"
    assert ended - server.first_request < DEADLINE + SLACK, f"took {ended - server.first_request:.1f} s"
    assert "my-org/merge" in line or server.url in line, line
    if behaviour == "drip":  # no read ever times out: only the push's deadline can end it
        assert f"within {DEADLINE:g} s" in line and "FUSEKIT_HUB_TIMEOUT" in line, line
    if behaviour == "reset":
        assert server.connections >= 2, "connection resets are transient and retried"


def test_push_with_a_hanging_commit_ends_within_the_deadline(output: Path, tmp_path: Path) -> None:
    with fake_hub(TOKEN) as (url, hub):
        hub.hang.append("/commit/")
        proc, ended = _push(output, _env(url, tmp_path))
    _assert_one_error_line(proc)
    assert hub.first_request is not None and ended - hub.first_request < DEADLINE + SLACK
    assert any("/commit/" in path for _, path in hub.requests), "the commit was never sent"
    assert not hub.files, "nothing may be committed"


def test_library_push_raises_in_time_and_then_restores_the_client(output: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """In-process: push_to_hub raises HubTimeoutError at its deadline even though each request may
    wait longer, and huggingface_hub's client factory is back once the abandoned worker has ended."""
    import huggingface_hub.constants as constants
    from huggingface_hub.utils import _http

    from fusekit.errors import HubTimeoutError
    from fusekit.io.hub import push_to_hub

    factory = _http._GLOBAL_CLIENT_FACTORY
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("FUSEKIT_HUB_REQUEST_TIMEOUT", "30")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with raw_server("drip") as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        started = time.monotonic()
        with pytest.raises(HubTimeoutError, match=r"did not finish within 1 s \(FUSEKIT_HUB_TIMEOUT\)"):
            push_to_hub(output, "my-org/merge", timeout=1.0, retry_delay=0)
        assert time.monotonic() - started < 2.0
        assert server.connections == 1
    until = time.monotonic() + 10  # the server has closed the dripping connection: the worker ends
    while _http._GLOBAL_CLIENT_FACTORY is not factory and time.monotonic() < until:
        time.sleep(0.05)
    assert _http._GLOBAL_CLIENT_FACTORY is factory


@pytest.mark.parametrize("debug", [False, True], ids=["plain", "FUSEKIT_DEBUG"])
def test_the_token_is_never_shown(debug: bool, output: Path, tmp_path: Path) -> None:
    # The server quotes the token in its error; huggingface_hub puts that text in its exception,
    # which FUSEKIT_DEBUG=1 prints with the traceback.
    with fake_hub(TOKEN) as (url, hub):
        hub.error_text = f"token {TOKEN} may not write here"
        hub.fail["/api/repos/create"] = [403]
        env = _env(url, tmp_path, FUSEKIT_DEBUG="1") if debug else _env(url, tmp_path)
        proc, _ = _push(output, env)
    assert proc.returncode == 2, proc.stderr
    assert TOKEN not in proc.stdout + proc.stderr
    if debug:
        assert "Traceback" in proc.stderr and "HfHubHTTPError" in proc.stderr, proc.stderr
        assert "token *** may not write here" in proc.stderr  # the server's text, token masked
    else:
        _assert_one_error_line(proc)
        assert "403" in proc.stderr


@pytest.mark.parametrize(("name", "value"), [
    ("FUSEKIT_HUB_RETRY_DELAY", "-1"), ("FUSEKIT_HUB_RETRY_DELAY", "nan"),
    ("FUSEKIT_HUB_RETRY_DELAY", "soon"), ("FUSEKIT_HUB_TIMEOUT", "0"), ("FUSEKIT_HUB_TIMEOUT", "inf"),
    ("FUSEKIT_HUB_TIMEOUT", "-5"), ("FUSEKIT_HUB_REQUEST_TIMEOUT", "NaN"),
    ("FUSEKIT_HUB_REQUEST_TIMEOUT", "1e400"),
])
def test_bad_time_settings_are_one_line(name: str, value: str, output: Path,
                                        monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    from fusekit.cli import main

    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as stopped:
        main(["push", str(output), "my-org/merge"])
    captured = capsys.readouterr()
    assert stopped.value.code == 2, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and name in lines[0] and repr(value) in lines[0], captured.err
    assert TOKEN not in captured.out + captured.err


def test_merge_with_push_checks_the_time_settings_before_merging(
        tiny_models: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from conftest import write_recipe

    from fusekit.cli import main

    recipe = write_recipe(tmp_path / "r.yaml", "merge_method: linear\nmodels:\n"
                          f"  - model: {tiny_models['math']}\n    parameters: {{weight: 0.5}}\n"
                          f"  - model: {tiny_models['code']}\n    parameters: {{weight: 0.5}}\n")
    monkeypatch.delenv("FUSEKIT_DEBUG", raising=False)
    monkeypatch.setenv("FUSEKIT_HUB_TIMEOUT", "ten minutes")
    with pytest.raises(SystemExit) as stopped:
        main(["merge", str(recipe), str(tmp_path / "out"), "--push-to-hub", "my-org/merge"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and len(err.strip().splitlines()) == 1, err
    assert "FUSEKIT_HUB_TIMEOUT='ten minutes'" in err
    assert not (tmp_path / "out").exists(), "the merge must not run"


def test_env_seconds_accepts_what_it_documents(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusekit.io.hub_deadline import default_deadline, env_seconds

    monkeypatch.setenv("FUSEKIT_HUB_RETRY_DELAY", " 0 ")
    assert env_seconds("FUSEKIT_HUB_RETRY_DELAY", 2.0, allow_zero=True) == 0.0
    monkeypatch.setenv("FUSEKIT_HUB_TIMEOUT", "2.5")
    assert env_seconds("FUSEKIT_HUB_TIMEOUT", 1.0) == 2.5
    monkeypatch.delenv("FUSEKIT_HUB_TIMEOUT")
    assert env_seconds("FUSEKIT_HUB_TIMEOUT", 7.0) == 7.0
    assert math.isclose(default_deadline(3 * 2**20), 600 + 3 * 2.0)


def test_deadline_refuses_late_requests_and_cuts_timeouts() -> None:
    import httpx2

    from fusekit.io.hub_deadline import Deadline, DeadlineExceeded

    deadline = Deadline(seconds=0.3, request_timeout=5.0)
    request = httpx2.Request("GET", "http://127.0.0.1:9/", extensions={"timeout": {"connect": None,
                                                                                  "read": 9.0}})
    deadline.on_request(request)
    timeouts = request.extensions["timeout"]
    assert set(timeouts) == {"connect", "read", "write", "pool"}
    assert all(0 < value <= 0.3 for value in timeouts.values()), timeouts
    assert not deadline.sleep(1.0)  # would pass the deadline: refused at once
    time.sleep(0.35)
    with pytest.raises(DeadlineExceeded):
        deadline.on_request(httpx2.Request("GET", "http://127.0.0.1:9/"))


def test_scrub_masks_every_form_of_a_token(monkeypatch: pytest.MonkeyPatch) -> None:
    from fusekit.redact import scrub

    monkeypatch.setenv("HF_TOKEN", "plain-secret-value-42")
    text = ("env plain-secret-value-42; hub hf_abcdefghijklmnopqrstuvwxyz0123456789; "
            "Authorization: Bearer abc.def; https://user:pa55word@example.com/x; hf_hub_download()")
    assert scrub(text) == ("env ***; hub ***; Authorization: Bearer ***; https://user:***@example.com/x; "
                           "hf_hub_download()")
