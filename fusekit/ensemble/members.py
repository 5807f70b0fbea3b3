"""Ensemble members: each model with its tokenizer's byte view, and a KV-cached text stream.

Vocabularies are compared through the bytes each token stands for, so byte-level BPE (``Ġthe``),
SentencePiece (``▁the``, ``<0x0A>``) and other tokenizers line up by what they spell. Special
tokens stand for no bytes; they are keyed by their text (end-of-sequence tokens share one key).
"""

from __future__ import annotations

import bisect
import codecs
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from fusekit.lm.decode import cache_keyword
from fusekit.lm.load import LoadedLM

EOS_KEY = "<eos>"
"""Union key every member's end-of-sequence token maps to."""


def _byte_decoder() -> dict[str, int]:
    """The inverse of the byte-level BPE alphabet: printable stand-in character → byte value."""
    visible = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in visible}
    spare = 0x100
    for byte in range(256):
        if byte not in table.values():
            table[chr(spare)] = byte
            spare += 1
    return table


_BYTE_DECODER = _byte_decoder()


def _decoder_kinds(spec: dict[str, Any]) -> set[str]:
    """Types named anywhere in the tokenizer.json decoder/pre-tokenizer (Sequence included)."""
    kinds: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if isinstance(node.get("type"), str):
                kinds.add(node["type"])
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec.get("decoder"))
    walk(spec.get("pre_tokenizer"))
    return kinds


@dataclass
class TokenVocab:
    """What each token id of one tokenizer spells.

    Attributes:
        pieces: bytes per id (``len == width``, the model's logit width); None for special and
            unused ids.
        keys: union key per id: the bytes, or a string for special tokens (None: unused).
        by_bytes: bytes → the id spelling them (the first one, when several do).
        eos_id, start_id: end-of-sequence id and the id every sequence starts with (BOS, else
            EOS, else None), as :mod:`fusekit.lm.score` uses it.
        fingerprint: equal for tokenizers that turn text into the same ids.
        family: e.g. ``BPE/ByteLevel``, for reports.
    """

    pieces: list[bytes | None]
    keys: list[bytes | str | None]
    by_bytes: dict[bytes, int]
    eos_id: int | None
    start_id: int | None
    fingerprint: str
    family: str
    special: dict[str, str] = field(default_factory=dict)

    @property
    def width(self) -> int:
        return len(self.pieces)

    def text_ids(self) -> list[int]:
        return [i for i, piece in enumerate(self.pieces) if piece]


def token_vocab(tokenizer: Any, width: int) -> TokenVocab:
    """Build the byte view of ``tokenizer`` for a model with ``width`` logits."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec: dict[str, Any] = json.loads(backend.to_str()) if backend is not None else {}
    kinds = _decoder_kinds(spec)
    byte_level = "ByteLevel" in kinds
    specials = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials |= {str(tok) for tok in added.values() if getattr(tok, "special", False)}
    eos_id = tokenizer.eos_token_id if isinstance(tokenizer.eos_token_id, int) else None
    start_id = next((i for i in (tokenizer.bos_token_id, eos_id) if isinstance(i, int)), None)
    pieces: list[bytes | None] = [None] * width
    keys: list[bytes | str | None] = [None] * width
    for token, index in vocab.items():
        if index >= width:
            continue
        if token in specials:
            keys[index] = EOS_KEY if index == eos_id else f"<special:{token}>"
            continue
        piece = _token_bytes(tokenizer, token, byte_level)
        if piece:
            pieces[index] = piece
            keys[index] = piece
    by_bytes: dict[bytes, int] = {}
    for index, piece in enumerate(pieces):
        if piece is not None:
            by_bytes.setdefault(piece, index)
    model = spec.get("model", {})
    family = f"{model.get('type', type(tokenizer).__name__)}/{'ByteLevel' if byte_level else 'text'}"
    behaviour = {k: spec.get(k) for k in ("normalizer", "pre_tokenizer", "model")}
    digest = hashlib.sha256(json.dumps([sorted(vocab.items()), behaviour, start_id, eos_id],
                                       sort_keys=True, default=str).encode()).hexdigest()[:16]
    special = {name: str(getattr(tokenizer, f"{name}_token", None))
               for name in ("bos", "eos", "pad", "unk") if getattr(tokenizer, f"{name}_token", None)}
    return TokenVocab(pieces, keys, by_bytes, eos_id, start_id, digest, family, special)


def _token_bytes(tokenizer: Any, token: str, byte_level: bool) -> bytes | None:
    if byte_level:
        try:
            return bytes(_BYTE_DECODER[ch] for ch in token)
        except KeyError:
            pass  # an added plain-text token
    if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):  # SentencePiece byte fallback
        try:
            return bytes([int(token[3:5], 16)])
        except ValueError:
            return None
    if "▁" in token:
        return token.replace("▁", " ").encode("utf-8")
    text = tokenizer.convert_tokens_to_string([token])
    return text.encode("utf-8") if text else None


def logit_width(lm: LoadedLM) -> int:
    return int(lm.model.get_output_embeddings().weight.shape[0])


@dataclass
class Member:
    """One model of an ensemble."""

    index: int
    ref: str
    lm: LoadedLM
    weight: float
    vocab: TokenVocab

    @property
    def tokenizer(self) -> Any:
        return self.lm.tokenizer

    def context(self) -> int:
        from fusekit.lm.score import max_context

        return max_context(self.lm)


def crop_cache(cache: Any, current: int, keep: int) -> Any:
    """Drop cached positions beyond ``keep``; None when nothing is kept."""
    if keep <= 0:
        return None
    if keep < current:
        cache.crop(keep - current)  # a negative count removes that many positions
    return cache


def _continues_utf8(pending: bytes, piece: bytes | str | None) -> bool:
    if not isinstance(piece, bytes):
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(pending + piece, final=False)
    except UnicodeDecodeError:
        return False
    return True


_VALID: dict[tuple[int, bytes], torch.Tensor] = {}


def utf8_mask(keys: Sequence[bytes | str | None], pending: bytes) -> torch.Tensor:
    """``(len(keys),)`` True for byte keys that keep ``pending + key`` valid UTF-8 (possibly ending
    inside a character), so generated text always decodes; cached per key list and ``pending``."""
    cache_key = (id(keys), pending)
    mask = _VALID.get(cache_key)
    if mask is None:
        mask = torch.tensor([_continues_utf8(pending, k) for k in keys], dtype=torch.bool)
        _VALID[cache_key] = mask
    return mask


def longest_complete_prefix(data: bytes) -> int:
    """Length of the longest prefix of ``data`` that is whole UTF-8 characters."""
    end = len(data)
    for back in range(1, min(4, end) + 1):
        byte = data[end - back]
        if byte & 0xC0 != 0x80:  # a lead byte (or ASCII) at end - back
            need = 1 if byte < 0x80 else 2 if byte >> 5 == 0b110 else 3 if byte >> 4 == 0b1110 else 4
            return end if back >= need else end - back
    return end


class TextStream:
    """One member following a growing text, with its own tokens and a KV cache.

    When the text changes, only the changed tail is re-tokenised: tokens ending a few tokens
    before the first changed character are kept (with their cached keys and values) and the rest
    is tokenised again from there. A text longer than the model's context keeps its last half.
    """

    MARGIN = 4  # tokens re-tokenised before the first changed character

    def __init__(self, member: Member) -> None:
        self.member = member
        self.lm = member.lm
        self.limit = member.context()
        self.text = ""
        start = member.vocab.start_id
        self.ids: list[int] = [] if start is None else [start]
        self.ends: list[int] = [0] * len(self.ids)  # character offset where each token ends
        self.base = 0  # character offset of the first kept token (after dropping old context)
        self.cache: Any = None
        self.cached = 0  # positions held in the cache
        self._logprobs: torch.Tensor | None = None
        self.forwarded_tokens = 0
        self.n_pending = 0  # trailing single-byte tokens of an unfinished character
        self._backend: Any = getattr(member.lm.tokenizer, "backend_tokenizer", None)

    def set_text(self, text: str, pending: bytes = b"") -> bool:
        """Follow ``text`` (usually the previous text plus a little more) and then the ``pending``
        bytes of an unfinished character, fed as single-byte tokens. False when this tokenizer has
        no token for one of those bytes (the member then cannot take part at this point)."""
        pending_ids = [self.member.vocab.by_bytes.get(bytes([b])) for b in pending]
        if None in pending_ids:
            return False
        if text != self.text or self.n_pending:
            self._follow(text)
        if pending_ids:
            self.ids = self.ids + [int(i) for i in pending_ids if i is not None]
            self.ends = self.ends + [len(text)] * len(pending_ids)
            self.n_pending = len(pending_ids)
            self._logprobs = None
        return True

    def _follow(self, text: str) -> None:
        held = self.ids  # the cache holds held[:self.cached]
        if self.n_pending:  # drop the bytes of an unfinished character fed last time
            self.ids, self.ends = self.ids[:-self.n_pending], self.ends[:-self.n_pending]
            self.n_pending = 0
            self._logprobs = None
        if text.startswith(self.text):  # the usual case while decoding: the text only grew
            common = len(self.text)
        else:
            common = 0
            limit = min(len(text), len(self.text))
            while common < limit and text[common] == self.text[common]:
                common += 1
        head = 1 if self.member.vocab.start_id is not None else 0
        keep = bisect.bisect_right(self.ends, common, lo=head, hi=len(self.ids))  # tokens ending by `common`
        keep = max(head, keep - self.MARGIN)
        anchor = max(self.ends[keep - 1] if keep > head else self.base, self.base)
        tail_ids, tail_ends = self._tokenize(text[anchor:])
        new_ids = self.ids[:keep] + tail_ids
        new_ends = self.ends[:keep] + [anchor + end for end in tail_ends]
        same = min(keep, self.cached)  # ids[:keep] are unchanged
        while same < min(len(new_ids), self.cached) and new_ids[same] == held[same]:
            same += 1
        self.cache = crop_cache(self.cache, self.cached, same)
        self.cached = same if self.cache is not None else 0
        self.ids, self.ends, self.text = new_ids, new_ends, text
        self._logprobs = None
        if len(self.ids) >= self.limit:
            self._slide()

    def _tokenize(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of ``text`` (no special tokens) and the character offset where each ends; through
        the fast tokenizer's backend directly where there is one (the same ids, less overhead)."""
        backend = self._backend
        if backend is not None and backend.truncation is None and backend.padding is None:
            encoding = backend.encode(text, add_special_tokens=False)
            return list(encoding.ids), [end for _, end in encoding.offsets]
        assert self.lm.tokenizer is not None
        tail = self.lm.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [int(i) for i in tail["input_ids"]], [int(end) for _, end in tail["offset_mapping"]]

    def _slide(self) -> None:
        head = 1 if self.member.vocab.start_id is not None else 0
        keep_from = len(self.ids) - self.limit // 2
        self.base = self.ends[keep_from - 1] if keep_from > head else self.base
        self.ids = self.ids[:head] + self.ids[keep_from:]
        self.ends = self.ends[:head] + self.ends[keep_from:]
        self.cache, self.cached = None, 0

    def logprobs(self) -> torch.Tensor:
        """``(width,)`` float32 log-probabilities of the next token after the current text."""
        if self._logprobs is not None:
            return self._logprobs
        if not self.ids:
            raise RuntimeError("a member without BOS/EOS needs some text before it can predict")
        if self.cached >= len(self.ids):  # everything cached, but the last logits are gone
            self.cache = crop_cache(self.cache, self.cached, len(self.ids) - 1)
            self.cached = len(self.ids) - 1 if self.cache is not None else 0
        new = torch.tensor([self.ids[self.cached:]], device=self.lm.device)
        positions = torch.arange(self.cached, len(self.ids), device=self.lm.device)[None]
        keyword = cache_keyword(self.lm.model)
        with torch.inference_mode():
            out = self.lm.model(input_ids=new, position_ids=positions, use_cache=True,
                                **{keyword: self.cache})
        self.forwarded_tokens += new.shape[1]
        self.cache, self.cached = getattr(out, keyword), len(self.ids)
        self._logprobs = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        return self._logprobs
