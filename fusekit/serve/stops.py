"""Stop strings: where the first one starts in a text, and how much of a text's tail to hold back
because it could still become one. Used by the decode worker (:mod:`fusekit.serve.batcher`), the
ensemble backend and the per-choice cutter of the app (:mod:`fusekit.serve.choices`).

Example:
    >>> first_stop("a\\nb END c", ["END"]), held_back("abc EN", ["END"])
    (4, 2)
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["first_stop", "held_back"]


def first_stop(text: str, stops: Sequence[str], start: int = 0) -> int | None:
    """Index of the first stop string found in ``text`` at or after ``start``, or None (empty stop
    strings are ignored)."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: Sequence[str], shown: int = 0) -> int:
    """Length of the longest tail of ``text`` (within its last ``len(text) - shown`` characters) that
    is the start of a stop string, so it must not be shown yet."""
    best = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text) - shown), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
