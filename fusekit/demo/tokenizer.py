"""The demo's tokenizers: the built-in byte-level tokenizer of the demo models, and the byte-level BPE
tokenizers trained for the demo experts.

Both use the same four special tokens, with the same ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2,
``<pad>`` 3. Writing the byte-level tokenizer needs only the standard library; training one needs the
``tokenizers`` library and saving it ``transformers`` (the ``lm`` extra).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fusekit.errors import FusekitError

UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN = "<unk>", "<s>", "</s>", "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
UNK_TOKEN_ID, BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID = range(len(SPECIAL_TOKENS))
TOKENIZER_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256
"""Natural vocabulary size of the built-in byte-level tokenizer: 4 specials + 256 byte tokens."""


def write_demo_json(path: Path, payload: object) -> None:
    """Write ``payload`` as indented UTF-8 JSON with a final newline."""
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


# --- the byte-level tokenizer of the demo models ------------------------------------------------


def _byte_symbols() -> list[str]:
    """The printable stand-in for each byte used by byte-level BPE, indexed by byte value.

    Bytes that are visible, non-space Latin-1 characters stand for themselves; the others
    (controls, space, soft hyphen...) are mapped in order to the code points from U+0100 on.
    """
    visible = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    symbols, spare = [], 0x100
    for byte in range(256):
        if byte in visible:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(spare))
            spare += 1
    return symbols


def _tokenizer_json() -> dict[str, object]:
    """A byte-level BPE without merges: token id = byte value + 4, with <s> prepended."""
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({symbol: len(SPECIAL_TOKENS) + b for b, symbol in enumerate(_byte_symbols())})
    byte_level = {"add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    bos = {"SpecialToken": {"id": BOS_TOKEN, "type_id": 0}}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [_added_token(i, token) for i, token in enumerate(SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": {"type": "ByteLevel", **byte_level},
        "post_processor": {
            "type": "TemplateProcessing",
            "single": [bos, _sequence("A")],
            "pair": [bos, _sequence("A"), bos, _sequence("B")],
            "special_tokens": {
                BOS_TOKEN: {"id": BOS_TOKEN, "ids": [BOS_TOKEN_ID], "tokens": [BOS_TOKEN]}
            },
        },
        "decoder": {"type": "ByteLevel", **byte_level},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": UNK_TOKEN,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }


def _added_token(token_id: int, content: str) -> dict[str, object]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _sequence(sequence_id: str) -> dict[str, object]:
    return {"Sequence": {"id": sequence_id, "type_id": 0}}


def write_byte_tokenizer(folder: Path, *, model_max_length: int) -> None:
    """Write the byte-level tokenizer (``tokenizer.json``, its config and special tokens) into ``folder``.

    Args:
        folder: an existing model folder.
        model_max_length: the longest input the tokenizer config allows, in tokens.
    """
    specials = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "unk_token": UNK_TOKEN,
        "pad_token": PAD_TOKEN,
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    write_demo_json(folder / "tokenizer.json", _tokenizer_json())
    write_demo_json(folder / "tokenizer_config.json", tokenizer_config)
    write_demo_json(folder / "special_tokens_map.json", specials)



# --- BPE tokenizers for the demo experts --------------------------------------------------------


def train_bpe_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    """A byte-level BPE ``tokenizers.Tokenizer`` of ``vocab_size`` tokens trained on ``texts``,
    prepending ``<s>`` to every input.

    Raises:
        FusekitError: the ``tokenizers`` library is not installed.
    """
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        from fusekit.extras import install_hint

        raise FusekitError(f"the demo experts need the tokenizers library; {install_hint('lm')}") from None
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A", pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))])
    return tokenizer


def save_bpe_tokenizer(tokenizer: Any, folder: Path, *, model_max_length: int) -> None:
    """Save a tokenizer from :func:`train_bpe_tokenizer` into ``folder`` as transformers reads it."""
    from fusekit.lm.load import import_transformers

    fast = import_transformers().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=UNK_TOKEN, bos_token=BOS_TOKEN, eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN, model_max_length=model_max_length, clean_up_tokenization_spaces=False)
    fast.save_pretrained(folder)


def token_stream(tokenizer: Any, documents: Sequence[str]) -> torch.Tensor:
    """All documents' tokens, each followed by ``</s>``, as one long ``(n_tokens,)`` int64 tensor."""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(documents), add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(EOS_TOKEN_ID)
    return torch.tensor(ids, dtype=torch.long)
