"""Ask/tell optimisers over the unit cube of a search space: CMA-ES, random search, grid search.

An optimiser hands out one generation of points at a time (:meth:`Optimizer.ask`) and learns their
scores (:meth:`Optimizer.tell`, lower is better). Every optimiser's first point is the space's
:meth:`~fusekit.tune.space.SearchSpace.default_point` (the hand-set recipe), so a search never ends
worse than where it started. Generations never depend on the number of workers, so a seed gives the
same candidates however they are evaluated, and :meth:`Optimizer.state_dict` restores the exact
stream of asks after an interruption.

- ``cma`` — CMA-ES (Hansen, "The CMA Evolution Strategy: A Tutorial", arXiv:1604.00772) from the
  ``cma`` package, bounded to [0, 1], started at the default point with step ``sigma``; a categorical
  dimension is a continuous coordinate binned to its choices.
- ``random`` — uniform points from a seeded generator.
- ``grid`` — a full grid sized to the evaluation budget: ``floor(budget^(1/d))`` points (at least 2)
  along each numeric dimension, each choice once along a categorical one.

The gradient optimiser (``adam``) is :class:`fusekit.tune.gradient.GradientSearch`: it needs the
model, not just scores.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import pickle
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from fusekit.tune.space import Dimension

if TYPE_CHECKING:
    from fusekit.tune.spec import TuneSpec

FAILED_SCORE = 1e9
"""What CMA-ES is told for a candidate whose score is not finite (a merge that produced NaN)."""


class Optimizer(Protocol):
    """Ask/tell over the unit cube; deterministic for a seed."""

    def ask(self) -> list[list[float]]:
        """One generation of unit-cube points (the first holds the default point first)."""
        ...

    def tell(self, points: list[list[float]], scores: list[float]) -> None:
        """The scores (lower is better) of the points of the last :meth:`ask`."""
        ...

    def done(self) -> bool:
        """Whether the evaluation budget (or the grid) is used up."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """A picklable state that :meth:`load_state_dict` restores to the same stream of asks."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`."""
        ...


def default_population(dimensions: int) -> int:
    """CMA-ES's default population ``4 + floor(3 ln d)``, used by every optimiser for its generations.

    >>> default_population(1), default_population(6)
    (4, 9)
    """
    return 4 + int(3 * math.log(max(dimensions, 1)))


def make_optimizer(spec: TuneSpec) -> Optimizer:
    """The optimiser the ``tune:`` block names, over the spec's search space.

    Args:
        spec: a loaded tune recipe.

    Returns:
        A :class:`CmaSearch`, :class:`RandomSearch` or :class:`GridSearch`.

    Raises:
        ValueError: ``optimizer: adam`` (it is :class:`fusekit.tune.gradient.GradientSearch`).

    Example:
        >>> optimizer = make_optimizer(load_tune_spec("configs/tune/merge-cma.yaml"))  # doctest: +SKIP
        >>> first = optimizer.ask()[0]  # doctest: +SKIP
    """
    settings, space = spec.settings, spec.space
    dims, default = space.dims, space.default_point()
    population = settings.population or default_population(len(dims))
    if settings.optimizer == "cma":
        return CmaSearch(default, population=population, sigma=settings.sigma, seed=settings.seed,
                         evaluations=settings.evaluations)
    if settings.optimizer == "random":
        return RandomSearch(default, population=population, seed=settings.seed,
                            evaluations=settings.evaluations)
    if settings.optimizer == "grid":
        if settings.evaluations is None:
            raise ValueError("grid search needs an evaluation budget")
        return GridSearch(dims, default, population=population, evaluations=settings.evaluations)
    raise ValueError(f"optimizer {settings.optimizer!r} is not ask/tell; use fusekit.tune.gradient")


class _Count:
    """Evaluations told so far against an optional budget."""

    def __init__(self, evaluations: int | None) -> None:
        self.evaluations = evaluations
        self.told = 0

    def left(self) -> int | None:
        return None if self.evaluations is None else max(0, self.evaluations - self.told)

    def cut(self, size: int) -> int:
        """A generation of ``size`` points, shortened to what the budget has left."""
        left = self.left()
        return size if left is None else min(size, left)


class RandomSearch:
    """Uniform random points in the unit cube (the default point first).

    Example:
        >>> search = RandomSearch([0.5, 0.5], population=3, seed=0, evaluations=6)
        >>> first = search.ask()
        >>> first[0], len(first)
        ([0.5, 0.5], 3)
    """

    def __init__(self, default: Sequence[float], *, population: int, seed: int,
                 evaluations: int | None) -> None:
        import numpy as np

        self.default = [float(u) for u in default]
        self.population = population
        self.count = _Count(evaluations)
        self.rng = np.random.Generator(np.random.PCG64(seed % 2**64))
        self.generation = 0

    def ask(self) -> list[list[float]]:
        size = self.count.cut(self.population)
        first = [list(self.default)] if self.generation == 0 and size > 0 else []
        fresh = self.rng.random((size - len(first), len(self.default)))
        self.generation += 1
        return first + [[float(u) for u in row] for row in fresh]

    def tell(self, points: list[list[float]], scores: list[float]) -> None:
        self.count.told += len(points)

    def done(self) -> bool:
        return self.count.left() == 0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "random", "rng": self.rng.bit_generator.state, "told": self.count.told,
                "generation": self.generation}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect(state, "random")
        self.rng.bit_generator.state = state["rng"]
        self.count.told, self.generation = int(state["told"]), int(state["generation"])


def grid_sizes(dims: Sequence[Dimension], evaluations: int) -> list[int]:
    """Points along each dimension of a grid of at most ``evaluations`` points.

    A categorical dimension takes each of its choices; the numeric ones share the rest of the budget
    equally: ``floor((evaluations / choices)^(1/d))`` points each, at least 2.

    Raises:
        ValueError: the budget is below the smallest grid (2 points per numeric dimension); the message
            says how many evaluations it needs.

    >>> grid_sizes([Dimension("a"), Dimension("b")], 20)
    [4, 4]
    """
    choices = math.prod(len(d.choices) for d in dims if d.choices is not None)
    numeric = sum(1 for d in dims if d.choices is None)
    smallest = choices * 2**numeric
    if evaluations < smallest:
        noun = "dimension" if len(dims) == 1 else "dimensions"
        raise ValueError(f"a grid over {len(dims)} {noun} needs at least {smallest} evaluations "
                         f"(2 points per number{', each method once' if choices > 1 else ''}), got "
                         f"{evaluations}; raise budget.evaluations or use optimizer cma or random")
    per_dim = _integer_root(evaluations // choices, numeric) if numeric else 1
    return [len(d.choices) if d.choices is not None else max(2, per_dim) for d in dims]


def _integer_root(value: int, degree: int) -> int:
    """``floor(value^(1/degree))`` exactly (no float rounding below a perfect power)."""
    root = int(round(value ** (1 / degree)))
    while root**degree > value:
        root -= 1
    while (root + 1) ** degree <= value:
        root += 1
    return root


class GridSearch:
    """Every point of a grid sized to the budget, the default point first, ``population`` at a time.

    Example:
        >>> search = GridSearch([Dimension("a")], [0.5], population=4, evaluations=3)
        >>> search.ask()
        [[0.5], [0.0], [1.0]]
    """

    def __init__(self, dims: Sequence[Dimension], default: Sequence[float], *, population: int,
                 evaluations: int) -> None:
        axes = [_axis(d, n) for d, n in zip(dims, grid_sizes(dims, evaluations), strict=True)]
        start = [float(u) for u in default]
        grid = [list(p) for p in itertools.product(*axes) if list(p) != start]
        self.points = ([start] + grid)[:evaluations]
        self.population = population
        self.next = 0

    def ask(self) -> list[list[float]]:
        chunk = self.points[self.next:self.next + self.population]
        self.next += len(chunk)
        return [list(p) for p in chunk]

    def tell(self, points: list[list[float]], scores: list[float]) -> None:
        """Grid points do not depend on scores."""

    def done(self) -> bool:
        return self.next >= len(self.points)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "grid", "next": self.next}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect(state, "grid")
        self.next = int(state["next"])


def _axis(dim: Dimension, size: int) -> list[float]:
    if dim.choices is not None:
        return [dim.unit(choice) for choice in dim.choices]
    return [i / (size - 1) for i in range(size)]


class _Normal:
    """``randn(*shape)`` from a generator of its own, for cma's ``randn`` option: pickled with the
    strategy, so a restored search draws what the interrupted one would have drawn."""

    def __init__(self, seed: int) -> None:
        import numpy as np

        self.rng = np.random.Generator(np.random.PCG64(seed % 2**64))

    def __call__(self, *shape: int) -> Any:
        return self.rng.standard_normal(shape)


class CmaSearch:
    """CMA-ES over the unit cube (the ``cma`` package), started at the default point.

    The default point is injected into the first generation, so it is evaluated first. Samples come
    from a generator of the strategy's own (:class:`_Normal`); for any other draw ``cma`` makes from
    numpy's global random state, this class keeps its own copy of that state and swaps it in for every
    call, so that nothing else drawing random numbers in the process changes the search.
    """

    def __init__(self, default: Sequence[float], *, population: int, sigma: float, seed: int,
                 evaluations: int | None) -> None:
        import cma
        import numpy as np

        self.count = _Count(evaluations)
        self.population = population
        self._numpy_state: Any = np.random.RandomState(seed % 2**32).get_state()
        options = {"bounds": [0, 1], "randn": _Normal(seed), "popsize": population,
                   "verbose": -9, "verb_log": 0, "verb_disp": 0, "tolflatfitness": 10**9,
                   "tolfun": 0, "tolfunhist": 0, "tolx": 0, "tolstagnation": 10**9}
        with self._own_random_state():
            self.es = cma.CMAEvolutionStrategy([float(u) for u in default], sigma, options)
            self.es.inject([[float(u) for u in default]], force=True)
        self._asked: list[Any] = []  # the last generation as cma returned it (told back unchanged)

    @contextlib.contextmanager
    def _own_random_state(self) -> Iterator[None]:
        import numpy as np

        saved = np.random.get_state()
        np.random.set_state(self._numpy_state)
        try:
            yield
        finally:
            self._numpy_state = np.random.get_state()
            np.random.set_state(saved)

    def ask(self) -> list[list[float]]:
        size = self.count.cut(self.population)
        if size == 0:
            return []
        with self._own_random_state():
            self._asked = list(self.es.ask())
        return [[min(max(float(u), 0.0), 1.0) for u in x] for x in self._asked[:size]]

    def tell(self, points: list[list[float]], scores: list[float]) -> None:
        self.count.told += len(points)
        if len(points) < len(self._asked):  # the budget's last, shortened generation: nothing to learn
            return
        values = [float(s) if math.isfinite(s) else FAILED_SCORE for s in scores]
        with self._own_random_state():
            self.es.tell(self._asked, values)

    def done(self) -> bool:
        return self.count.left() == 0

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "cma", "es": pickle.dumps(self.es), "numpy": self._numpy_state,
                "told": self.count.told, "asked": self._asked}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _expect(state, "cma")
        self.es = pickle.loads(state["es"])  # noqa: S301 -- our own checkpoint, written by state_dict
        self._numpy_state = state["numpy"]
        self.count.told, self._asked = int(state["told"]), list(state["asked"])


def _expect(state: dict[str, Any], kind: str) -> None:
    if state.get("kind") != kind:
        raise ValueError(f"the checkpoint holds a {state.get('kind')!r} optimiser's state, not {kind!r}")
