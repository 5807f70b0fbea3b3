"""Byte sizes as users write them (``500MB``, ``2GiB``, mergekit's ``5B``), for options and recipes."""

from __future__ import annotations

import re

from fusekit.errors import FusekitError

_SIZE = re.compile(r"^\s*(?P<number>\d{1,30}(?:\.\d{1,30})?)\s*(?P<unit>[A-Za-z]*)\s*$")
_UNITS = {"": 1, "b": 10**9, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
MAX_SIZE = 2**62  # far above any disk or memory; bounds what a typo can ask for


def parse_size(text: str, option: str = "--out-shard-size") -> int:
    """Parse a byte size.

    Args:
        text: a number with an optional unit: ``500MB``, ``2GiB``, ``1e9`` is not accepted;
            ``5B`` means five billion bytes, as in mergekit.
        option: the option or key the text came from, named in the error.

    Returns:
        The size in bytes, at least 1 and at most 2**62.

    Raises:
        FusekitError: the text is not a size, is zero, or is absurdly large.

    Example:
        >>> parse_size("2GiB")
        2147483648
    """
    match = _SIZE.match(text)
    unit = match.group("unit").lower() if match else None
    if match is None or unit not in _UNITS:
        raise FusekitError(f"{option}: '{text[:40]}' is not a size; write e.g. 500MB, 2GB, 1GiB or 5B")
    size = int(float(match.group("number")) * _UNITS[unit])
    if size <= 0:
        raise FusekitError(f"{option}: '{text}' must be larger than zero")
    if size > MAX_SIZE:
        raise FusekitError(f"{option}: '{text[:40]}' is larger than the largest size fusekit "
                           f"accepts ({MAX_SIZE} bytes)")
    return size
