"""What each token of one vocabulary spells, indexed for the byte-level beam.

Built once per vocabulary (cached by its fingerprint and logit width) from
:class:`~fusekit.ensemble.members.TokenVocab`'s ``pieces``, which already maps byte-level BPE's
printable alphabet back to bytes, SentencePiece's ``▁`` to a space and ``<0xNN>`` to byte ``NN``, and
leaves special and added tokens without text.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from fusekit.ensemble.members import TokenVocab


@dataclass(frozen=True)
class ByteTable:
    """One vocabulary's tokens by the bytes they spell.

    Attributes:
        text_ids: ``(n,)`` ids of the tokens that spell bytes.
        first: ``(n,)`` the first byte of each of those tokens.
        extend: prefix → ``(ids, next bytes)``: the tokens whose bytes start with the prefix and are
            longer than it, and the byte each has right after it.
        exact: bytes → the ids spelling exactly those bytes.
        eos_id: the end-of-sequence id (its probability is the byte distribution's end symbol), or None.
        allowed: ``(width,)`` True for text tokens and EOS: the tokens a byte-level model may emit;
            the others (BOS, padding, unused ids) are renormalised away.
    """

    text_ids: torch.Tensor
    first: torch.Tensor
    extend: dict[bytes, tuple[torch.Tensor, torch.Tensor]]
    exact: dict[bytes, list[int]]
    eos_id: int | None
    allowed: torch.Tensor


_TABLES: dict[tuple[str, int], ByteTable] = {}


def byte_table(vocab: TokenVocab) -> ByteTable:
    """The :class:`ByteTable` of ``vocab``, built on first use and cached.

    Args:
        vocab: a member's token vocabulary (its ``pieces`` give each id's bytes).

    Returns:
        The table.

    Example:
        >>> table = byte_table(member.vocab)  # doctest: +SKIP
        >>> table.exact[b"the"]  # doctest: +SKIP
        [312]
    """
    key = (vocab.fingerprint, vocab.width)
    table = _TABLES.get(key)
    if table is None:
        table = _build(vocab)
        _TABLES[key] = table
    return table


def _build(vocab: TokenVocab) -> ByteTable:
    ids = [i for i, piece in enumerate(vocab.pieces) if piece]
    longer: dict[bytes, tuple[list[int], list[int]]] = defaultdict(lambda: ([], []))
    exact: dict[bytes, list[int]] = defaultdict(list)
    first: list[int] = []
    for i in ids:
        piece = vocab.pieces[i]
        assert piece is not None
        first.append(piece[0])
        exact[piece].append(i)
        for k in range(1, len(piece)):
            entry = longer[piece[:k]]
            entry[0].append(i)
            entry[1].append(piece[k])
    allowed = torch.zeros(vocab.width, dtype=torch.bool)
    allowed[ids] = True
    eos = vocab.eos_id if vocab.eos_id is not None and vocab.eos_id < vocab.width else None
    if eos is not None:
        allowed[eos] = True
    return ByteTable(
        text_ids=torch.tensor(ids, dtype=torch.long), first=torch.tensor(first, dtype=torch.long),
        extend={p: (torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long))
                for p, (a, b) in longer.items()},
        exact=dict(exact), eos_id=eos, allowed=allowed)
