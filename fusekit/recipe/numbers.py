"""Ranges for the numbers users give in recipes and options: finite floats, seeds, temperatures.

A number that cannot be a number (NaN, ``1e400``, a 400-digit integer) or that would make a run
endless is refused where it is read, with a message naming the allowed range. Each check raises
``ValueError`` (recipe validators turn it into a ``file:line`` error) or, through :func:`check_option`,
a one-line :class:`~fusekit.errors.FusekitError` naming the option.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator

from fusekit.errors import FusekitError

FLOAT_MAX = sys.float_info.max
SEED_MIN = -(2**63)  # torch.manual_seed accepts [-2**63, 2**64 - 1]
SEED_MAX = 2**64 - 1
T = TypeVar("T")


def _digits(value: int) -> int:
    """How many decimal digits ``value`` has (estimated past 4000, where str() may refuse)."""
    if abs(value).bit_length() < 13_000:
        return len(str(abs(value)))
    return int(abs(value).bit_length() * 0.30103) + 1


def finite_float(value: int | float) -> float:
    """``value`` as a finite float.

    Raises:
        ValueError: NaN, infinity, or an integer too large for a float; the message names the range.

    Example:
        >>> finite_float(3)
        3.0
    """
    allowed = f"must be a finite number between {-FLOAT_MAX:.3g} and {FLOAT_MAX:.3g}"
    try:
        number = float(value)
    except OverflowError:  # an integer of hundreds of digits
        raise ValueError(f"{allowed}, got an integer of {_digits(int(value))} digits") from None
    if not math.isfinite(number):
        raise ValueError(f"{allowed}, got {value!r}")
    return number


def check_seed(value: int) -> int:
    """A random seed torch accepts: an integer in [-2**63, 2**64 - 1].

    Raises:
        ValueError: outside that range.
    """
    if not SEED_MIN <= value <= SEED_MAX:
        shown = value if _digits(value) < 40 else f"an integer of {_digits(value)} digits"
        raise ValueError(f"must be an integer between -2**63 and 2**64 - 1, got {shown}")
    return value


Seed = Annotated[int, AfterValidator(check_seed)]
"""A recipe's ``seed`` field: an int in torch's seed range."""


def check_temperature(value: float) -> float:
    """A sampling temperature: finite and >= 0 (0 means greedy).

    Raises:
        ValueError: NaN, infinite or negative.
    """
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"must be a finite number >= 0 (0 is greedy decoding), got {value!r}")
    return value


def check_option(option: str, check: Callable[[T], T], value: T) -> T:
    """Run ``check`` on a command-line option's value; a one-line FusekitError naming the option.

    Example:
        >>> check_option("--seed", check_seed, 7)
        7
    """
    try:
        return check(value)
    except ValueError as exc:
        raise FusekitError(f"{option}: {exc}") from None


def is_number(value: Any) -> bool:
    """True for an int or float that is not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)
