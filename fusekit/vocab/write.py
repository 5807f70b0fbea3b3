"""Write the merged model's tokenizer: the source tokenizer's files, with the output vocabulary's
new tokens appended as added tokens and the tokens it dropped removed.

``tokenizer.json`` gets the entries (and loses dropped tokens from its vocabulary and merges);
``tokenizer_config.json``'s ``added_tokens_decoder`` and ``added_tokens.json``, where the source has
them, are kept in step, so transformers maps every token to the id the merge gave its rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fusekit.io.files import write_json
from fusekit.io.refs import ResolvedModel
from fusekit.io.tokenizer import copy_tokenizer, read_json_object
from fusekit.vocab.union import OutputVocab

_DECODER_KEYS = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")


def write_output_tokenizer(source: ResolvedModel, vocab: OutputVocab, out: Path) -> list[str]:
    """Copy ``source``'s tokenizer files into ``out`` and apply ``vocab``'s changes to them.

    Args:
        source: the model whose tokenizer the output vocabulary starts from.
        vocab: the output vocabulary.
        out: the output folder.

    Returns:
        The names of the files written.

    Raises:
        CheckpointError: a tokenizer file of ``source`` is broken.
    """
    copied = copy_tokenizer(source, out)
    if not vocab.new_entries and not vocab.stripped:
        return copied
    if (out / "tokenizer.json").is_file():
        data = read_json_object(out / "tokenizer.json")
        write_json(out / "tokenizer.json", _tokenizer_json(data, vocab))
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        config = read_json_object(config_path)
        decoder = config.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            kept = {k: v for k, v in decoder.items()
                    if not (isinstance(v, dict) and v.get("content") in vocab.stripped)}
            kept.update({str(e["id"]): {k: e[k] for k in _DECODER_KEYS if k in e} for e in vocab.new_entries})
            write_json(config_path, {**config, "added_tokens_decoder": kept})
    added_path = out / "added_tokens.json"
    if added_path.is_file():
        added = {k: v for k, v in read_json_object(added_path).items() if k not in vocab.stripped}
        added.update({e["content"]: e["id"] for e in vocab.new_entries})
        write_json(added_path, added)
    return copied


def _tokenizer_json(data: dict[str, Any], vocab: OutputVocab) -> dict[str, Any]:
    entries = [e for e in data.get("added_tokens") or [] if e.get("content") not in vocab.stripped]
    result = {**data, "added_tokens": [*entries, *vocab.new_entries]}
    model = dict(data.get("model") or {})
    if vocab.stripped and isinstance(model.get("vocab"), dict):
        model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in vocab.stripped}
        if isinstance(model.get("merges"), list):
            model["merges"] = [m for m in model["merges"] if not _touches(m, vocab.stripped)]
        result["model"] = model
    return result


def _touches(merge: Any, stripped: frozenset[str]) -> bool:
    """Whether a BPE merge (``"a b"`` or ``["a", "b"]``) uses a dropped token."""
    parts = merge.split(" ") if isinstance(merge, str) else merge
    return any(part in stripped for part in parts)
