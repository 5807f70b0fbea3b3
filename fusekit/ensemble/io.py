"""Prompt files in, answer files out (JSON lines)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fusekit.errors import FusekitError
from fusekit.io.userfiles import DATA_LIMIT, LINE_LIMIT, read_user_text


def read_prompts(path: Path) -> list[str]:
    """Prompts from a JSON lines file: ``{"prompt": ...}`` (or ``"text"``) objects or JSON strings;
    blank lines are skipped. One-line errors for a missing, empty or malformed file."""
    if not path.exists():  # a FIFO or device exists: read_user_text refuses it by name
        raise FusekitError(f"prompts file {path} does not exist; pass a JSON lines file to --prompts")
    try:
        text = read_user_text(path, what="prompts file", limit=DATA_LIMIT, max_line_bytes=LINE_LIMIT)
        lines = text.splitlines()
    except UnicodeDecodeError:
        raise FusekitError(f"prompts file {path} is not UTF-8 text") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FusekitError(f"{path}:{number}: not JSON ({exc.msg}); write one "
                               '{"prompt": "..."} object per line') from None
        value = item.get("prompt", item.get("text")) if isinstance(item, dict) else item
        if not isinstance(value, str) or not value:
            raise FusekitError(f'{path}:{number}: expected {{"prompt": "<non-empty text>"}}, '
                               f"got {line[:60]!r}")
        prompts.append(value)
    if not prompts:
        raise FusekitError(f"prompts file {path} is empty; write one {{\"prompt\": ...}} object per line")
    return prompts


def answer_record(answer: Any) -> dict[str, Any]:
    record = {"prompt": answer.prompt, "answer": answer.text, "new_tokens": answer.new_tokens,
              "finished": answer.finished}
    if answer.candidates is not None:
        record["candidates"] = answer.candidates
    return record


def write_answers(path: Path, answers: list[Any]) -> None:
    """Write answers as JSON lines to a sibling temp file, then rename it into place."""
    from fusekit.io.files import atomic_file
    from fusekit.io.outputs import check_out_file

    path = check_out_file(path)
    with atomic_file(path) as temp, temp.open("w", encoding="utf-8") as handle:
        for answer in answers:
            handle.write(json.dumps(answer_record(answer), ensure_ascii=False) + "\n")
