"""Router data: JSONL files with one example per line.

Each line is a JSON object holding either ``text`` (the query is the text, and a model's quality is
how well it predicts it) or ``prompt`` and ``completion`` (the query is the prompt; quality is how
well the model predicts the completion after it). An optional ``label`` names the model that should
answer; other keys (``domain``, ``id``, ...) are kept but not used for training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusekit.errors import FusekitError
from fusekit.io.userfiles import DATA_LIMIT, LINE_LIMIT, read_user_text


class RouteDataError(FusekitError, ValueError):
    """A router data file is missing, empty or malformed, or names an unknown model."""


@dataclass(frozen=True)
class Example:
    """One query and what the router may learn from it.

    Attributes:
        query: what the router sees (``text``, or ``prompt``).
        completion: the text that is scored after the prompt, or None for ``text`` rows.
        label: the model named by the data, or None.
        line: 1-based line in the file, for error messages.
        extra: the line's other keys (``domain``, ...).
    """

    query: str
    completion: str | None
    label: str | None
    line: int
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def scored_text(self) -> str:
        """The text a model's bits per byte are measured on."""
        return self.completion if self.completion is not None else self.query


def _string(row: dict[str, Any], key: str, where: str) -> str | None:
    value = row.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise RouteDataError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    return value


def load_examples(path: Path | str, *, models: Sequence[str] | None = None,
                  queries_only: bool = False) -> list[Example]:
    """Read a JSONL data file; one-line errors name the file and line.

    Args:
        path: the JSONL file.
        models: when given, every ``label`` must be one of these names.
        queries_only: the file only gives queries (to calibrate on): a ``prompt`` needs no
            ``completion``.

    Returns:
        The examples, in file order.

    Raises:
        RouteDataError: no such file, an empty file, a line that is not a JSON object with
            ``text`` or ``prompt`` + ``completion``, an empty text, or an unknown label.
    """
    path = Path(path)
    try:
        raw = read_user_text(path, what="data file", limit=DATA_LIMIT, max_line_bytes=LINE_LIMIT)
    except FileNotFoundError:
        raise RouteDataError(f"data file {path}: not found; check the 'data' path (relative paths are "
                             f"taken from the current folder)") from None
    except IsADirectoryError:
        raise RouteDataError(f"data file {path}: is a folder; give a JSONL file") from None
    except UnicodeDecodeError as exc:
        raise RouteDataError(f"data file {path}: not UTF-8 text (byte {exc.start}); a data file is "
                             "JSONL, one JSON object per line") from None
    known = set(models) if models is not None else None
    examples = [_example(line, f"{path}:{number}", number, known, queries_only)
                for number, line in enumerate(raw.splitlines(), start=1) if line.strip()]
    if not examples:
        raise RouteDataError(f"data file {path}: holds no examples; write one JSON object per line, "
                             'e.g. {"text": "..."}')
    return examples


def _example(line: str, where: str, number: int, known: set[str] | None, queries_only: bool) -> Example:
    """One data line as an :class:`Example`; ``where`` (``file:line``) starts every error."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise RouteDataError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno}); each line "
                             "must be one JSON object") from None
    if not isinstance(row, dict):
        raise RouteDataError(f"{where}: expected a JSON object with 'text' (or 'prompt' and "
                             f"'completion'), got {type(row).__name__}")
    text, prompt = _string(row, "text", where), _string(row, "prompt", where)
    completion, label = _string(row, "completion", where), _string(row, "label", where)
    if text is not None and (prompt is not None or completion is not None):
        raise RouteDataError(f"{where}: give either 'text' or 'prompt' + 'completion', not both")
    if text is None and (prompt is None or (completion is None and not queries_only)):
        raise RouteDataError(f"{where}: needs 'text', or both 'prompt' and 'completion'"
                             if not queries_only else f"{where}: needs 'text' or 'prompt'")
    query = text if text is not None else prompt
    assert query is not None
    if not query.strip() or (completion is not None and not completion.strip()):
        raise RouteDataError(f"{where}: the {'text' if text is not None else 'prompt or completion'}"
                             " is empty; remove the line or fill it in")
    if label is not None and known is not None and label not in known:
        raise RouteDataError(f"{where}: label '{label}' is not one of the router's models "
                             f"({', '.join(sorted(known))}); fix the label or the model's 'name'")
    extra = {k: v for k, v in row.items() if k not in ("text", "prompt", "completion", "label")}
    return Example(query, completion, label, number, extra)
