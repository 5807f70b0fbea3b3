"""A model's vocabulary, read straight from its tokenizer files (no transformers, no tokenizers).

transformers' ``get_vocab()`` of a fast tokenizer is the model's vocabulary in ``tokenizer.json``
plus its added tokens; tokens listed only in ``tokenizer_config.json`` (``added_tokens_decoder``) or
``added_tokens.json`` are added when it loads. :func:`read_vocab` gives the same token → id map, the
added tokens' entries (to write them into a merged tokenizer), and the tokenizer's *scheme*: what
its token strings stand for (byte-level BPE symbols, SentencePiece pieces with ``▁``, WordPiece
pieces), since token strings of different schemes cannot be compared.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusekit.errors import CheckpointError
from fusekit.io.tokenizer import read_json_object

TOKENIZER_JSON = "tokenizer.json"
METASPACE = "\u2581"  # ▁, SentencePiece's word-start mark


@dataclass(frozen=True)
class TokenizerVocab:
    """One model's vocabulary.

    Attributes:
        ref: the model it belongs to (for messages).
        tokens: every token string → its id (model vocabulary and added tokens).
        added: the added tokens' ``tokenizer.json`` entries, by content.
        scheme: what token strings stand for, e.g. ``"BPE, byte-level"`` or ``"Unigram, metaspace"``.
    """

    ref: str
    tokens: dict[str, int]
    added: dict[str, dict[str, Any]] = field(default_factory=dict)
    scheme: str = "unknown"

    def by_id(self) -> list[tuple[int, str]]:
        """(id, token) pairs in id order."""
        return sorted((i, t) for t, i in self.tokens.items())


def read_vocab(ref: str, folder: Path) -> TokenizerVocab:
    """The vocabulary of the tokenizer in ``folder``.

    Args:
        ref: the model's reference, for messages.
        folder: the model folder holding ``tokenizer.json``.

    Returns:
        Its vocabulary, added tokens and scheme.

    Raises:
        CheckpointError: ``tokenizer.json`` is missing or not a tokenizer.
    """
    path = folder / TOKENIZER_JSON
    if not path.is_file():
        raise CheckpointError(f"model '{ref}': tokenizer surgery (tokenizer_source / tokenizer.source) reads "
                              f"{path}, which does not exist; save the tokenizer in the fast format "
                              "(tokenizer.json) or merge models that share one tokenizer")
    data = read_json_object(path)
    model = data.get("model")
    if not isinstance(model, dict):
        raise CheckpointError(f"{path}: has no 'model' object; restore the model's own tokenizer.json")
    tokens = _model_vocab(path, model)
    added: dict[str, dict[str, Any]] = {}
    for entry in _added_entries(path, data.get("added_tokens", [])):
        tokens[entry["content"]] = entry["id"]
        added[entry["content"]] = entry
    for content, token_id in _extra_added(folder):
        if content not in tokens:
            tokens[content] = token_id
            added[content] = {"id": token_id, "content": content, "single_word": False, "lstrip": False,
                              "rstrip": False, "normalized": False, "special": True}
    return TokenizerVocab(ref, tokens, added, _scheme(data, model))


def _model_vocab(path: Path, model: dict[str, Any]) -> dict[str, int]:
    vocab = model.get("vocab")
    if isinstance(vocab, dict) and all(isinstance(i, int) for i in vocab.values()):
        return dict(vocab)
    if isinstance(vocab, list):  # Unigram: [piece, score] pairs, the id is the position
        return {str(entry[0]): i for i, entry in enumerate(vocab) if isinstance(entry, list) and entry}
    raise CheckpointError(f"{path}: model.vocab is neither a token → id map nor a Unigram list; "
                          "restore the model's own tokenizer.json")


def _added_entries(path: Path, entries: Any) -> Iterator[dict[str, Any]]:
    if not isinstance(entries, list):
        raise CheckpointError(f"{path}: 'added_tokens' is not a list; restore the model's own tokenizer.json")
    for entry in entries:
        if not (isinstance(entry, dict) and isinstance(entry.get("content"), str)
                and isinstance(entry.get("id"), int)):
            raise CheckpointError(f"{path}: an added token lacks 'content' or 'id': {str(entry)[:80]}")
        yield entry


def _extra_added(folder: Path) -> Iterator[tuple[str, int]]:
    """Added tokens that transformers adds on load from tokenizer_config.json and added_tokens.json."""
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        decoder = read_json_object(config_path).get("added_tokens_decoder") or {}
        for key, entry in decoder.items() if isinstance(decoder, dict) else []:
            if str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str):
                yield entry["content"], int(key)
    added_path = folder / "added_tokens.json"
    if added_path.is_file():
        for content, token_id in read_json_object(added_path).items():
            if isinstance(token_id, int):
                yield content, token_id


def _types(node: Any) -> Iterator[str]:
    """Every ``type`` in a (possibly nested ``Sequence``) normalizer / pre-tokenizer / decoder."""
    if isinstance(node, dict):
        if isinstance(node.get("type"), str):
            yield node["type"]
        if node.get("type") == "Replace" and METASPACE in str(node.get("content", "")):
            yield "Metaspace"
        for value in node.values():
            if isinstance(value, (dict, list)):
                yield from _types(value)
    elif isinstance(node, list):
        for item in node:
            yield from _types(item)


def _scheme(data: dict[str, Any], model: dict[str, Any]) -> str:
    parts = {t for key in ("normalizer", "pre_tokenizer", "decoder") for t in _types(data.get(key))}
    if "ByteLevel" in parts:
        marks = "byte-level"
    elif "Metaspace" in parts:
        marks = "metaspace"
    elif model.get("type") == "WordPiece" or "WordPiece" in parts:
        marks = "wordpiece"
    else:
        marks = "plain"
    return f"{model.get('type', 'unknown')}, {marks}"
