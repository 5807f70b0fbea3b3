"""Bounded reads of user-named files (fusekit/io/userfiles.py): what is refused, and at which size."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from fusekit.errors import FusekitError
from fusekit.io.userfiles import (
    LINE_LIMIT,
    RECIPE_LIMIT,
    Limit,
    UserFileError,
    iter_jsonl,
    read_user_bytes,
    read_user_text,
)


def test_reads_a_regular_file_up_to_the_limit_exactly(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_bytes(b"a" * 100)
    assert read_user_bytes(path, what="recipe", limit=100) == b"a" * 100
    with pytest.raises(UserFileError, match=r"r\.yaml: 100 bytes is larger than the 99 bytes limit"):
        read_user_bytes(path, what="recipe", limit=99)


def test_an_over_limit_file_names_the_file_limit_and_variable(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.yaml"
    path.write_bytes(b"x" * (3 * 2**20))
    monkeypatch.setenv("FUSEKIT_MAX_RECIPE_BYTES", "2MiB")
    with pytest.raises(UserFileError) as info:
        read_user_text(path, what="recipe", limit=RECIPE_LIMIT)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and "3.0 MiB" in message and "2.0 MiB" in message
    assert "FUSEKIT_MAX_RECIPE_BYTES" in message
    monkeypatch.setenv("FUSEKIT_MAX_RECIPE_BYTES", "4MB")
    assert len(read_user_text(path, what="recipe", limit=RECIPE_LIMIT)) == 3 * 2**20


def test_a_limit_variable_that_is_not_a_size_is_a_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FUSEKIT_MAX_RECIPE_BYTES", "lots")
    with pytest.raises(FusekitError, match="FUSEKIT_MAX_RECIPE_BYTES"):
        RECIPE_LIMIT.bytes()
    monkeypatch.delenv("FUSEKIT_MAX_RECIPE_BYTES")
    assert RECIPE_LIMIT.bytes() == 16 * 2**20
    assert Limit(5, "FUSEKIT_TEST_UNSET_LIMIT").bytes() == 5


def test_a_folder_is_refused(tmp_path: Path) -> None:
    with pytest.raises(UserFileError, match="is a folder"):
        read_user_text(tmp_path, what="recipe", limit=100)


def test_dev_zero_is_refused_without_reading() -> None:
    with pytest.raises(UserFileError, match="/dev/zero: is a character device"):
        read_user_text("/dev/zero", what="recipe", limit=100)


def test_a_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    outcome: list[BaseException] = []

    def read() -> None:
        try:
            read_user_text(fifo, what="recipe", limit=100)
        except BaseException as exc:  # handed to the test thread
            outcome.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "reading a FIFO blocked"
    assert len(outcome) == 1 and isinstance(outcome[0], UserFileError)
    assert "FIFO" in str(outcome[0])


def test_missing_and_non_utf8_files_keep_the_builtin_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_user_text(tmp_path / "nope.yaml", what="recipe", limit=100)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"ok\n\xff\xfe")
    with pytest.raises(UnicodeDecodeError):
        read_user_text(bad, what="recipe", limit=100)


def test_a_long_line_is_refused_with_its_number(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"short\r\n" + b"y" * 10 + b"\n" + b"z" * 11 + b"\nend")
    assert read_user_text(path, what="data file", limit=1000, max_line_bytes=11).endswith("end")
    with pytest.raises(UserFileError, match=r"d\.jsonl:3: the line is longer than the 10 bytes limit"):
        read_user_text(path, what="data file", limit=1000, max_line_bytes=10)


def test_iter_jsonl_numbers_lines_and_skips_blank_ones(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"a": 1}\n\n   \n"two"\r\n[3]', encoding="utf-8")
    assert list(iter_jsonl(path, what="data file")) == [(1, {"a": 1}), (4, "two"), (5, [3])]


@pytest.mark.parametrize(("content", "expected"), [
    (b'{"a": 1}\n{"a": \n', r"d\.jsonl:2: not valid JSON"),
    (b'{"a": 1}\n\n"\xff"\n', r"d\.jsonl:3: not UTF-8 text"),
    (b'{"a": 1}\n"' + b"q" * 40 + b'"\n', r"d\.jsonl:2: the line is longer than the 32 bytes limit"),
    (b"[" * 100_000 + b"\n", r"d\.jsonl:1: the JSON nests too deeply"),
])
def test_iter_jsonl_errors_name_the_line(tmp_path: Path, content: bytes, expected: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(content)
    limit = 32 if b"q" in content else LINE_LIMIT
    with pytest.raises(UserFileError, match=expected):
        list(iter_jsonl(path, what="data file", max_line_bytes=limit))


def test_iter_jsonl_refuses_a_file_over_the_limit_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_bytes(b"{}\n" * 10)
    with pytest.raises(UserFileError, match="larger than the 29 bytes limit"):
        next(iter_jsonl(path, what="data file", max_bytes=29))
    assert len(list(iter_jsonl(path, what="data file", max_bytes=30))) == 10
