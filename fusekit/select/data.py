"""The texts that expert selection and learned weights are measured on.

A data file is either JSONL, one ``{"text": ...}`` object per line (the router data format of
:mod:`fusekit.route.data`; other keys are ignored), or any other file read as one UTF-8 text, as
``fusekit score --text`` reads it.
"""

from __future__ import annotations

from pathlib import Path

from fusekit.errors import FusekitError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


def read_data_texts(path: str | Path, *, completions: bool = False,
                    option: str | None = "--data") -> list[str]:
    """The texts of a data file: each JSONL row's ``text``, or the whole file as one text.

    Args:
        path: a ``.jsonl`` / ``.ndjson`` file of ``{"text": ...}`` rows, or a plain text file.
        completions: also accept ``prompt`` + ``completion`` rows, each giving the text scored for it
            (the completion after its prompt, as router data is scored); else they are refused.
        option: the option or key that named the file, for the hint of a missing file.

    Returns:
        The texts, in file order (at least one, none empty).

    Raises:
        FusekitError: one line naming the file when it is missing, empty, not UTF-8, malformed, or
            (without ``completions``) holds ``prompt`` + ``completion`` rows.
    """
    path = Path(path)
    if not path.exists():
        raise FusekitError(f"data file {path} does not exist; pass a .jsonl file of {{\"text\": ...}} rows "
                           "or a UTF-8 text file" + (f" to {option}" if option else ""))
    if path.suffix.lower() not in JSONL_SUFFIXES:
        from fusekit.lm.score import read_text_file

        return [read_text_file(path)]
    from fusekit.route.data import load_examples

    examples = load_examples(path)
    if completions:
        return [example.scored_text for example in examples]
    for example in examples:
        if example.completion is not None:
            raise FusekitError(f"data file {path}:{example.line}: a prompt + completion row; expert "
                               "selection and learned weights score whole texts, so write {\"text\": ...}")
    return [example.query for example in examples]
