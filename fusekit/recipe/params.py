"""Resolve a recipe parameter for one tensor and one model, as mergekit does.

Precedence, most specific first: the slice source's ``parameters``, the model entry's, the output
slice's, the recipe's top-level ``parameters``, then the method's default. A gradient is interpolated
at ``t``, the tensor's relative depth in [0, 1]; filtered entries are tried in order and the first
whose filter occurs in the tensor name (or is ``"*"`` / absent) gives the value. A filter is a
plain substring, not a glob, exactly as in mergekit. Per-model parameters are matched against that
model's own tensor name (its source layer index), method-wide ones against the output name.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from fusekit.recipe.schema import Filtered, ParameterValue, Scalar


def interpolate_gradient(points: Sequence[float], t: float) -> float:
    """Piecewise-linear value of evenly spaced ``points`` at ``t`` in [0, 1].

    >>> interpolate_gradient([0.0, 1.0, 0.0], 0.25)
    0.5
    """
    if len(points) == 1:
        return points[0]
    scaled = t * (len(points) - 1)
    low = min(int(math.floor(scaled)), len(points) - 1)
    high = min(len(points) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * points[low] + frac * points[high]


def filter_matches(pattern: str | None, tensor_name: str) -> bool:
    """True when ``pattern`` selects ``tensor_name``: absent, ``"*"``, or a substring of it."""
    return pattern is None or pattern == "*" or pattern in tensor_name


def evaluate(value: ParameterValue, tensor_name: str, t: float) -> Scalar | None:
    """The concrete value of one parameter setting for ``tensor_name`` at depth ``t``.

    Returns None when the setting is a filter list and no entry matches.
    """
    if isinstance(value, tuple) and value and isinstance(value[0], Filtered):
        for entry in value:
            assert isinstance(entry, Filtered)
            if filter_matches(entry.filter, tensor_name):
                return evaluate(entry.value, tensor_name, t)
        return None
    if isinstance(value, tuple):
        if all(isinstance(v, float) for v in value):
            return interpolate_gradient([float(v) for v in value if isinstance(v, float)], t)
        step = value[int(t * (len(value) - 1))]  # bools and strings are not interpolated
        assert not isinstance(step, Filtered)
        return step
    return value


@dataclass(frozen=True)
class ParameterScope:
    """The parameter tables that apply to one output tensor, most specific last.

    ``per_model`` maps a model reference to its tables (slice source first, then model entry);
    ``shared`` holds the output slice's and the recipe's top-level tables.
    """

    per_model: Mapping[str, Sequence[Mapping[str, ParameterValue]]] = field(default_factory=dict)
    shared: Sequence[Mapping[str, ParameterValue]] = ()

    def lookup(self, name: str, tensor_name: str, t: float, model: str | None = None) -> Scalar | None:
        """Value of ``name`` for ``model`` (or method-wide when None); None when unset.

        ``tensor_name`` is what filters are matched against: the model's own tensor name for
        per-model parameters, the output tensor name for method-wide ones.
        """
        tables = list(self.per_model.get(model, ())) if model is not None else []
        for table in [*tables, *self.shared]:
            if name in table:
                result = evaluate(table[name], tensor_name, t)
                if result is not None:
                    return result
        return None
