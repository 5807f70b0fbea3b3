"""``fusekit score``: the numbers are the library's, and bad input exits 2 with one line."""

from __future__ import annotations

import json
import math
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from fusekit.cli import main
from fusekit.lm import load_lm, score_text

TEXT = "int main(void) {\n    return 0;  /* ok */\n}\n"


def _run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(exit_info.value.code or 0), out, err


@pytest.fixture(scope="module")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("texts") / "c.txt"
    path.write_text(TEXT * 3, encoding="utf-8")
    return path


def test_json_rows_match_the_library(tokenizer_models: dict[str, Path], text_file: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(capsys, "score", tokenizer_models["base"], tokenizer_models["math"],
                        "--text", text_file, "--json", "--context", "32")
    assert code == 0
    rows = json.loads(out)
    assert [(r["model"], r["text"]) for r in rows] == [
        (str(tokenizer_models[name]), str(text_file)) for name in ("base", "math")]
    for row, name in zip(rows, ("base", "math"), strict=True):
        expected = score_text(load_lm(tokenizer_models[name]), TEXT * 3, context=32)
        assert row["n_bytes"] == len((TEXT * 3).encode()) == expected.n_bytes
        assert row["n_tokens"] == expected.n_tokens
        assert row["nll_nats"] == pytest.approx(expected.nll_nats, rel=1e-6)
        assert row["bits_per_byte"] == pytest.approx(row["nll_nats"] / math.log(2) / row["n_bytes"])
        assert row["perplexity"] == pytest.approx(math.exp(row["nll_nats"] / row["n_tokens"]))
    assert rows[0]["nll_nats"] != rows[1]["nll_nats"]


def test_table_has_one_row_per_model_and_text(tokenizer_models: dict[str, Path], text_file: Path,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    other = tmp_path / "prose.txt"
    other.write_text("Plain words, nothing else.\n", encoding="utf-8")
    code, out, _ = _run(capsys, "score", tokenizer_models["base"], "--text", text_file,
                        "--text", other)
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].split() == ["model", "text", "bytes", "tokens", "bits/byte", "perplexity"]
    assert [line.split()[1] for line in lines[1:]] == [str(text_file), str(other)]


@pytest.mark.parametrize("problem", ["missing", "empty", "not-utf8", "no-tokenizer", "bad-context"])
def test_bad_input_exits_2_with_one_line(problem: str, tokenizer_models: dict[str, Path],
                                         tiny_models: dict[str, Path], text_file: Path,
                                         tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, text, extra = tokenizer_models["base"], text_file, []
    if problem == "missing":
        text = tmp_path / "nope.txt"
    elif problem == "empty":
        text = tmp_path / "empty.txt"
        text.write_text("", encoding="utf-8")
    elif problem == "not-utf8":
        text = tmp_path / "latin1.txt"
        text.write_bytes("café".encode("latin-1"))
    elif problem == "no-tokenizer":
        model = tiny_models["base"]
    else:
        extra = ["--context", "1"]
    code, out, err = _run(capsys, "score", model, "--text", text, *extra)
    expected = {"missing": "nope.txt does not exist", "empty": "empty.txt is empty",
                "not-utf8": "is not UTF-8", "no-tokenizer": "has no tokenizer files",
                "bad-context": "--context 1"}[problem]
    assert code == 2
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and expected in err, err


def test_console_entry_point(tokenizer_models: dict[str, Path], text_file: Path,
                             run_cli: Callable[..., subprocess.CompletedProcess[str]]) -> None:
    proc = run_cli("score", tokenizer_models["base"], "--text", text_file, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)[0]["n_bytes"] == len((TEXT * 3).encode())
