"""Progress bars on stderr for every step that can take more than a moment, decided in one place.

A bar is drawn only when stderr is a terminal, the ``CI`` environment variable is unset (or empty)
and nobody asked for quiet (``fusekit ... --quiet`` calls :func:`set_quiet`); otherwise every helper
here costs nothing and prints nothing, so library code calls them unconditionally. Bars are tqdm's,
cleared when their step ends (``leave=False``), so only the summary lines stay on screen.

Example:
    >>> from fusekit.progress import bar, steps
    >>> for text in bar(["a", "b"], desc="scoring"):  # a bar on a terminal, nothing elsewhere
    ...     pass
    >>> with steps("training", total=100, unit="step") as advance:
    ...     advance(100)
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

T = TypeVar("T")
_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar of this process off (``True``) or back to the default (``False``).

    Args:
        quiet: what ``--quiet`` says; the command-line face calls this once per command.
    """
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    """Whether bars are drawn: not quiet, stderr is a terminal, and ``CI`` is not set.

    Returns:
        True when a helper of this module draws on stderr.
    """
    if _quiet or os.environ.get("CI"):
        return False
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):  # replaced or closed stderr
        return False


def _shape() -> dict[str, Any]:
    """tqdm's size options: follow the terminal's size, or 80 × 24 where it reports none (a
    pseudo-terminal nobody sized, where tqdm would hide the bar)."""
    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except (AttributeError, ValueError, OSError):
        size = os.terminal_size((0, 0))
    if size.columns > 0 and size.lines > 0:
        return {"dynamic_ncols": True}
    return {"ncols": 80, "nrows": 24}


def _tqdm(**options: Any) -> Any:
    from tqdm import tqdm

    return tqdm(file=sys.stderr, leave=False, disable=not enabled(), **_shape(), **options)


def bar(iterable: Iterable[T], *, desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """Iterate over ``iterable`` with a bar saying ``desc`` (nothing is drawn when :func:`enabled` is
    False).

    Args:
        iterable: what to go through.
        desc: what is being done, e.g. ``"scoring 1500 examples with python"``.
        total: the number of items when ``iterable`` has no ``len``.
        unit: what one item is (``"example"``, ``"prompt"``).

    Yields:
        The items of ``iterable``.
    """
    if not enabled():
        yield from iterable
        return
    progress = _tqdm(iterable=iterable, desc=desc, total=total, unit=unit)
    try:
        yield from progress
    finally:
        progress.close()


@contextmanager
def steps(desc: str, *, total: float | None, unit: str = "it") -> Iterator[Callable[[float], None]]:
    """A bar for work done in pieces: the block gets ``advance(n)`` to call as pieces finish.

    Args:
        desc: what is being done, e.g. ``"training base + 4 experts"``.
        total: the amount of work (None: a counter without an end).
        unit: what one unit of work is (``"step"``, ``"window"``).

    Yields:
        ``advance(n)``: add ``n`` units done (a no-op when :func:`enabled` is False).
    """
    if not enabled():
        yield lambda _n: None
        return
    progress = _tqdm(desc=desc, total=total, unit=unit)
    try:
        yield progress.update
    finally:
        progress.close()


def write(line: str) -> None:
    """Print ``line`` on stderr without tearing a bar that is being drawn (the bar is redrawn below).

    Args:
        line: one line of text, without its newline.
    """
    if enabled():
        from tqdm import tqdm

        tqdm.write(line, file=sys.stderr)
    else:
        print(line, file=sys.stderr, flush=True)


def label(ref: object) -> str:
    """A short name for a model reference or file in a bar's description: the last part of each
    path (``/data/models/c`` → ``c``; ``base+adapter`` folders → ``base+adapter``; ``org/name`` →
    ``name``), so the bar itself still fits on the line.

    Args:
        ref: a model reference, path or name.

    Returns:
        The short name.
    """
    parts = str(ref).split("+")
    return "+".join(part.rstrip("/").rsplit("/", 1)[-1] or part for part in parts)


@contextmanager
def hub_bars() -> Iterator[None]:
    """Within the block, huggingface_hub's own upload and download bars follow the same rule as
    fusekit's (off without a terminal, with ``CI`` or ``--quiet``): a bar it leaves half drawn would
    otherwise share a line with the one-line error that may follow."""
    from huggingface_hub.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    if enabled() or are_progress_bars_disabled():
        yield
        return
    disable_progress_bars()
    try:
        yield
    finally:
        enable_progress_bars()
