"""Shared fixtures: tiny Llama checkpoints built once per session, and a CLI runner.

Models are built by ``fusekit.demo`` (2 layers, hidden 32, vocab 64 unless a test needs a
tokenizer); numbers in tests are checked against float64 references computed in the tests.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fusekit.demo import build_demo_models

# Runs in tests (and the CLIs they start) keep their digest cache out of the user's ~/.cache.
os.environ.setdefault("FUSEKIT_CACHE", tempfile.mkdtemp(prefix="fusekit-test-cache-"))

TINY = {"hidden_size": 32, "num_layers": 2, "vocab_size": 64, "num_attention_heads": 4,
        "num_key_value_heads": 2, "with_tokenizer": False}


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, math, code: float32, one file each, no tokenizer."""
    return build_demo_models(tmp_path_factory.mktemp("tiny"), **TINY)


@pytest.fixture(scope="session")
def sharded_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same models as ``tiny_models``, split into several shards with an index."""
    return build_demo_models(tmp_path_factory.mktemp("sharded"), max_shard_bytes=20_000, **TINY)


@pytest.fixture(scope="session")
def bf16_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same models stored in bfloat16."""
    return build_demo_models(tmp_path_factory.mktemp("bf16"), dtype=torch.bfloat16, **TINY)


@pytest.fixture(scope="session")
def tokenizer_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Models with a tokenizer, for tests that load the output with transformers."""
    return build_demo_models(tmp_path_factory.mktemp("tok"), hidden_size=32, num_layers=2,
                             num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="session")
def tied_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Models with tied input/output embeddings (no lm_head tensor)."""
    return build_demo_models(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True, **TINY)


def load_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (possibly sharded) safetensors checkpoint folder."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the real ``fusekit`` console entry point in a subprocess."""

    def run(*args: str | Path, cwd: Path | None = None, env: dict[str, str] | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, **(env or {})}
        full_env.pop("FUSEKIT_DEBUG", None)
        return subprocess.run([sys.executable, "-m", "fusekit", *map(str, args)], cwd=cwd,
                              env=full_env, capture_output=True, text=True, timeout=timeout)

    return run


def in_process_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``fusekit ARGS...`` through :func:`fusekit.cli.main` in this process (a fresh interpreter per
    call would cost seconds); returns (exit code, stdout, stderr)."""
    from fusekit.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        logging.getLogger().handlers.clear()  # main() installs a handler on this test's stderr
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main(list(args))
        captured = capsys.readouterr()
        return int(exit_info.value.code or 0), captured.out, captured.err

    return run


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread; several threads spin against each other on 2 busy
    cores. Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
