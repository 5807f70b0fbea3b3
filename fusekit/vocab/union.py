"""The output vocabulary of a merge and each model's permutation into it, as mergekit 0.1.5 builds them.

* ``base``: the base model's tokenizer, less any token whose id is at or past the base's
  ``vocab_size`` (the embedding has no row for it).
* a model reference: that model's tokenizer as it is.
* ``union``: the base's vocabulary (as for ``base``), then every other token of the members that is
  an ordinary vocabulary entry (members in order, each in id order), then their added tokens (same
  order; the first member's settings win). New tokens get the next free ids. Tokens at or past a
  member's ``vocab_size`` are left out.

Tokens named under ``tokenizer.tokens`` that the vocabulary lacks are appended last. A model's
permutation maps each output id to its own row for that token, or -1 where it lacks it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from fusekit.vocab.files import TokenizerVocab


@dataclass(frozen=True)
class OutputVocab:
    """The merged model's vocabulary.

    Attributes:
        source: ``"union"``, ``"base"`` or the model whose tokenizer it is.
        tokenizer_ref: the model whose tokenizer files the output's start from.
        tokens: every output token → its id.
        new_entries: added-token entries to append to that tokenizer (ids past its own).
        stripped: tokens of that tokenizer the output drops (ids past its ``vocab_size``).
        size: rows of the output embedding: ``length`` padded to ``pad_to_multiple_of``.
    """

    source: str
    tokenizer_ref: str
    tokens: dict[str, int]
    new_entries: tuple[dict[str, Any], ...]
    stripped: frozenset[str]
    size: int

    @property
    def length(self) -> int:
        """Ids the tokens use: the largest id plus one."""
        return max(self.tokens.values(), default=-1) + 1


def new_token_entry(content: str, token_id: int) -> dict[str, Any]:
    """The added-token entry transformers writes for a plain ``add_tokens(content)``."""
    return {"id": token_id, "content": content, "single_word": False, "lstrip": False, "rstrip": False,
            "normalized": True, "special": False}


def build_output_vocab(source: str, members: Mapping[str, TokenizerVocab], *, base: str,
                       vocab_sizes: Mapping[str, int], add_tokens: Sequence[str] = (),
                       pad_to_multiple_of: int | None = None) -> OutputVocab:
    """Build the output vocabulary.

    Args:
        source: ``"union"``, ``"base"`` or a model reference (a key of ``members``).
        members: every model's vocabulary, the base first.
        base: the base model (the donor of the output's config and tokenizer files).
        vocab_sizes: each model's embedding rows (``vocab_size`` of its config).
        add_tokens: tokens the ``tokens:`` block names (appended when missing).
        pad_to_multiple_of: pad the number of rows up to a multiple of this.

    Returns:
        The output vocabulary.
    """
    entries: list[dict[str, Any]] = []
    if source not in ("union", "base"):
        tokens, stripped, ref = dict(members[source].tokens), frozenset[str](), source
    else:
        keep = vocab_sizes[base]
        tokens = {t: i for t, i in members[base].tokens.items() if i < keep}
        stripped = frozenset(members[base].tokens) - frozenset(tokens)
        ref = base
        if source == "union":
            entries = _union_entries(tokens, members, vocab_sizes)
    for token in add_tokens:
        if token not in tokens:
            entries.append(_append(tokens, new_token_entry(token, 0)))
    length = max(tokens.values(), default=-1) + 1
    size = length
    if pad_to_multiple_of and size % pad_to_multiple_of:
        size += pad_to_multiple_of - size % pad_to_multiple_of
    return OutputVocab(source, ref, tokens, tuple(entries), stripped, size)


def _append(tokens: dict[str, int], entry: dict[str, Any]) -> dict[str, Any]:
    """Give ``entry`` the next free id in ``tokens`` and add it there."""
    token_id = max(tokens.values(), default=-1) + 1
    tokens[entry["content"]] = token_id
    return {**entry, "id": token_id}


def _union_entries(tokens: dict[str, int], members: Mapping[str, TokenizerVocab],
                   vocab_sizes: Mapping[str, int]) -> list[dict[str, Any]]:
    """Extend ``tokens`` (the base's) with the other members' tokens; the new added-token entries."""
    added = {t for ref, m in members.items() for t, e in m.added.items() if e["id"] < vocab_sizes[ref]}
    entries = []
    for ref, member in members.items():
        for token_id, token in member.by_id():
            if token_id < vocab_sizes[ref] and token not in added and token not in tokens:
                entries.append(_append(tokens, new_token_entry(token, 0)))
    for ref, member in members.items():
        for token, entry in sorted(member.added.items(), key=lambda item: item[1]["id"]):
            if entry["id"] < vocab_sizes[ref] and token not in tokens:
                entries.append(_append(tokens, dict(entry)))
    return entries


def permutation(vocab: OutputVocab, member: TokenizerVocab, rows: int) -> list[int]:
    """For each output id, the member's row for that token, or -1 where it has none.

    Args:
        vocab: the output vocabulary.
        member: the model's vocabulary.
        rows: the model's embedding rows (ids at or past it have no row).

    Returns:
        A list of ``vocab.length`` row indices.
    """
    result = [-1] * vocab.length
    for token, out_id in vocab.tokens.items():
        own = member.tokens.get(token, -1)
        result[out_id] = own if own < rows else -1
    return result
