"""Sparsifiers for task vectors: which entries of ``τ = θ − θ_base`` survive, and how they are rescaled.

Each function takes one task vector and returns a tensor of the same shape and dtype in which dropped
entries are ``τ · 0`` (so ``−0`` for negative entries, as mergekit 0.1.5 produces). The rules follow
mergekit 0.1.5's ``sparsify.py``:

- ``magnitude`` (TIES, Yadav et al. 2023, arXiv:2306.01708): keep the ``max(1, ⌊density · numel⌋)``
  entries of largest ``|τ|`` over the whole tensor.
- ``magnitude_outliers`` (Model Breadcrumbs, Davari & Belilovsky 2023, arXiv:2312.06795): in
  ascending ``|τ|`` order skip the ``n − ⌊density · n⌋ − ⌊gamma · n⌋`` smallest (at least 0), then
  keep the next ``⌊density · n⌋``; so the ``⌊gamma · n⌋`` largest go as outliers.
- ``random`` (DARE, Yu et al. 2023, arXiv:2311.03099): keep each entry with probability ``density``.
- ``della_magprune`` (DELLA, Deep et al. 2024, arXiv:2406.11617): along dim 1 (a 1-D tensor is one
  row), an entry of ascending magnitude rank ``r`` in ``1..n`` is kept with probability
  ``density − ε + 2ε · (r − 1) / (n − 1)``.

``density ≥ 1`` returns ``τ`` untouched (no rescaling either). With ``rescale`` the kept entries are
scaled by ``‖τ‖₁ / ‖kept‖₁`` — mergekit matches the L1 norm per tensor, not ``1 / density`` — unless
either norm is below 1e-7.

Dtypes follow mergekit on the CPU: masks and norms are computed in the task vector's dtype for the
magnitude rules; the random rules work in bfloat16 for bfloat16 tensors and in float32 otherwise
(float16 and float64 included), then cast back. Magnitudes are ranked as float32 (float64 rounds to
float32 first, as mergekit's ``w.float()``).

Ties in magnitude: mergekit sorts with torch's unstable CPU sort, whose choice among equal
magnitudes depends on the CPU's vector extensions (AVX2/AVX512 sorting networks vs ``std::sort``), so
it has no reproducible rule. Here equal magnitudes are ordered by flat index (a stable sort), on every
device. Without ties at the cut-off the kept set is mergekit's exactly.

Selection counts instead of sorting: the cut-off magnitude is found from histograms of the integer
bit patterns of ``|τ|`` (ordered like the values, since they are non-negative floats), the high 16
bits first for 32-bit floats; this is linear in the tensor size, where mergekit's full argsort is
``O(n log n)`` and several times slower on a 32000 × 2048 embedding.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from fusekit.ops.rows import exact_total, row_sums

Sparsifier = Literal["magnitude", "magnitude_outliers", "random", "della_magprune"]

_NORM_EPS = 1e-7
_HALF = 1 << 16


# -- magnitude order ----------------------------------------------------------------------------------


def magnitude_keys(tensor: torch.Tensor) -> torch.Tensor:
    """Non-negative integer keys ordered as ``|tensor|`` in float32, flattened: ``(numel,)``.

    16-bit floats give int16 keys, everything else int32 keys of the float32 magnitude.
    """
    magnitude = tensor.detach().abs().reshape(-1)
    if magnitude.dtype in (torch.bfloat16, torch.float16):
        return magnitude.view(torch.int16)
    return magnitude.to(torch.float32).view(torch.int32)


def _pick_from_counts(counts: torch.Tensor, position: int, *, largest: bool) -> tuple[int, int]:
    """The bin holding ``position`` of the order, and how many entries precede that bin."""
    ordered = counts.flip(0) if largest else counts
    cumulative = ordered.cumsum(0)
    index = int(torch.searchsorted(cumulative, torch.tensor([position], device=counts.device),
                                   right=True)[0])
    before = int(cumulative[index]) - int(ordered[index])
    return (counts.numel() - 1 - index if largest else index), before


def _high_halves(keys: torch.Tensor) -> torch.Tensor:
    """Bits 16..30 of non-negative int32 keys, as int16: ``(numel,)``."""
    return (keys >> 16).to(torch.int16)


class _Cut:
    """The first ``count`` keys of a stable sort, found from histograms and applied block by block.

    Resolved, the cut is a key ``K`` and a quota: every key beyond ``K`` (above it when ``largest``,
    below otherwise) is kept, and of the keys equal to ``K`` the first ``quota`` in index order.
    """

    def __init__(self, numel: int, count: int, *, largest: bool) -> None:
        self.largest = largest
        self.everything = count >= numel
        self.nothing = count <= 0
        self.position = count - 1  # of the last kept key in the order
        self.key = 0
        self.before = 0  # keys strictly before ``key`` in the order
        self.seen = 0  # keys equal to ``key`` met so far in this pass

    @property
    def trivial(self) -> bool:
        return self.everything or self.nothing

    def mask(self, keys: torch.Tensor) -> torch.Tensor:
        """Which of the next block's keys are kept: ``(block numel,)`` bool."""
        if self.trivial:
            return torch.full_like(keys, self.everything, dtype=torch.bool)
        mask = keys > self.key if self.largest else keys < self.key
        tied = (keys == self.key).nonzero().squeeze(1)  # (n_tied,) increasing
        quota = self.position + 1 - self.before
        mask[tied[: max(0, quota - self.seen)]] = True
        self.seen += tied.numel()
        return mask


class StableSelection:
    """Exact selection by the stable order of magnitude keys over a tensor seen in row blocks.

    Each cut keeps the first ``count`` keys of ``argsort(keys, descending=largest, stable=True)``.
    Resolving them takes one pass over the blocks for 16-bit keys (a histogram of every key) and
    two for 32-bit keys (the high halves, then the low halves inside each cut's high bucket). Then
    :meth:`masks` gives the kept entries block by block; blocks must come in row order, and each
    pass restarts with :meth:`end_pass`. Counting is exact, so the result does not depend on how
    the tensor is cut into blocks.
    """

    def __init__(self, numel: int, cuts: list[tuple[int, bool]], *, wide: bool) -> None:
        self.cuts = [_Cut(numel, count, largest=largest) for count, largest in cuts]
        self.wide = wide
        needed = any(not cut.trivial for cut in self.cuts)
        self.passes = (2 if wide else 1) if needed else 0
        self._counts: torch.Tensor | None = None
        self._low: dict[int, torch.Tensor] = {}

    def observe(self, stage: int, keys: torch.Tensor) -> None:
        """Count the keys of one block (``stage`` 0: whole or high halves; 1: low halves)."""
        if stage == 0:
            part = _high_halves(keys) if self.wide else keys
            counts = torch.bincount(part, minlength=_HALF // 2).cpu()
            self._counts = counts if self._counts is None else self._counts + counts
            return
        high = _high_halves(keys)
        for bucket in self._low:
            low = keys[high == bucket] & (_HALF - 1)
            self._low[bucket] += torch.bincount(low, minlength=_HALF).cpu()

    def end_pass(self, stage: int) -> None:
        """Resolve what the pass's counts tell; restart the tie counters for the next pass."""
        live = [cut for cut in self.cuts if not cut.trivial]
        if stage == 0 and self._counts is not None:
            for cut in live:
                cut.key, cut.before = _pick_from_counts(self._counts, cut.position, largest=cut.largest)
            self._counts = None
            if self.wide:
                self._low = {cut.key: torch.zeros(_HALF, dtype=torch.int64) for cut in live}
        elif stage == 1:
            for cut in live:
                low, before_low = _pick_from_counts(self._low[cut.key], cut.position - cut.before,
                                                    largest=cut.largest)
                cut.key, cut.before = (cut.key << 16) | low, cut.before + before_low
            self._low = {}
        for cut in self.cuts:
            cut.seen = 0

    def masks(self, keys: torch.Tensor) -> list[torch.Tensor]:
        """Each cut's kept entries in the next block, in row order: ``(block numel,)`` bool each."""
        return [cut.mask(keys) for cut in self.cuts]


def select(keys: torch.Tensor, cuts: list[tuple[int, bool]]) -> list[torch.Tensor]:
    """:class:`StableSelection` over one block holding the whole tensor."""
    selection = StableSelection(keys.numel(), cuts, wide=keys.dtype != torch.int16)
    for stage in range(selection.passes):
        selection.observe(stage, keys)
        selection.end_pass(stage)
    return selection.masks(keys)


def first_in_order(keys: torch.Tensor, count: int, *, largest: bool) -> torch.Tensor:
    """Mask of the first ``count`` keys of a stable sort (ties by index): ``(numel,)`` bool.

    ``largest`` sorts descending; equal keys still come in increasing index order, as in
    ``torch.argsort(keys, descending=largest, stable=True)[:count]``.
    """
    return select(keys, [(count, largest)])[0]


def magnitude_cuts(numel: int, sparsifier: Sparsifier, density: float,
                   gamma: float = 0.0) -> tuple[list[tuple[int, bool]], bool]:
    """The cuts of the magnitude rules, and whether the kept set is the first minus the second.

    ``magnitude`` keeps the ``max(1, ⌊density · n⌋)`` largest; ``magnitude_outliers`` keeps the
    ascending positions from ``skipped`` to ``skipped + ⌊density · n⌋``.
    """
    if sparsifier == "magnitude":
        return [(max(1, int(density * numel)), True)], False
    kept = int(density * numel)
    skipped = max(0, numel - kept - int(gamma * numel))
    return [(skipped + kept, False), (skipped, False)], True


def kept_by_cuts(masks: list[torch.Tensor], difference: bool) -> torch.Tensor:
    return masks[0] & ~masks[1] if difference else masks[0]


# -- one task vector, streamed ------------------------------------------------------------------------

STAGES = ("count", "refine", "norms")  # statistics passes, in the order they run


@dataclass(frozen=True)
class SparsifyRule:
    """How one task vector is thinned: the sparsifier and its per-model parameters."""

    kind: Sparsifier
    density: float
    gamma: float = 0.0
    epsilon: float = 0.0
    rescale: bool = False


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of mergekit's random masks on the CPU: bfloat16 stays, anything else is float32."""
    return dtype if dtype == torch.bfloat16 else torch.float32


class SparsifierStream:
    """One task vector's sparsification, fed in row blocks over several passes.

    The magnitude rules first count keys (``count``, and ``refine`` for 32-bit keys, see
    :class:`StableSelection`); with ``rescale`` a ``norms`` pass sums ``‖τ‖₁`` and ``‖kept‖₁`` row
    by row (see :mod:`fusekit.ops.rows`); :meth:`apply` then thins each block. The
    random rules redraw the same uniforms in every pass from a fresh ``generator()``, in row order,
    which gives the draws of one call over the whole tensor. So any cut into row blocks gives the
    bytes of one whole block.

    Args:
        rule: the sparsifier and its parameters.
        shape / dtype: the whole task vector's.
        generator: makes the CPU generator the random rules draw from.
    """

    def __init__(self, rule: SparsifyRule, *, shape: tuple[int, ...], dtype: torch.dtype,
                 generator: Callable[[], torch.Generator] | None = None) -> None:
        self.rule = rule
        self.numel = math.prod(shape)
        self.identity = rule.density >= 1
        self.zero = not self.identity and rule.density <= 0 and rule.kind in ("magnitude",
                                                                              "della_magprune")
        self.selection: StableSelection | None = None
        if rule.kind in ("magnitude", "magnitude_outliers") and not (self.identity or self.zero):
            cuts, self._difference = magnitude_cuts(self.numel, rule.kind, rule.density, rule.gamma)
            self.selection = StableSelection(self.numel, cuts, wide=dtype.itemsize > 2)
        self._generator = generator
        self._draws: torch.Generator | None = None
        self._norms: tuple[list[float], list[float]] = ([], [])
        self._factor: tuple[float, float] | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None

    def needs(self, stage: str) -> bool:
        if self.identity or self.zero:
            return False
        counting = self.selection.passes if self.selection else 0
        return {"count": counting >= 1, "refine": counting >= 2, "norms": self.rule.rescale}[stage]

    def observe(self, stage: str, delta: torch.Tensor) -> None:
        """Gather ``stage``'s statistics from the next block of the task vector."""
        if not self.needs(stage):
            return
        if stage != "norms":
            assert self.selection is not None
            self.selection.observe(STAGES.index(stage), magnitude_keys(delta))
            return
        work, masked = self._thin(delta)
        self._norms[0].extend(row_sums(work.abs()))
        self._norms[1].extend(row_sums(masked.abs()))
        self._last = (delta, masked) if delta.numel() == self.numel else None

    def end_pass(self, stage: str) -> None:
        """Close ``stage``: resolve what it counted; the next pass starts again from row 0."""
        if not self.needs(stage):
            return
        if self.selection is not None:
            self.selection.end_pass(STAGES.index(stage))
        if stage == "norms":
            self._factor = (exact_total(self._norms[0]), exact_total(self._norms[1]))  # ‖τ‖₁, ‖kept‖₁
            self._norms = ([], [])
        self._draws = None

    def apply(self, delta: torch.Tensor) -> torch.Tensor:
        """The next block, thinned (and rescaled), in the task vector's dtype."""
        if self.identity:
            return delta
        if self.zero:
            return torch.zeros_like(delta)
        cached, self._last = self._last, None
        masked = cached[1] if cached is not None and cached[0] is delta else self._thin(delta)[1]
        if self._factor is not None:
            # Norms rounded to the work dtype and divided there, as mergekit does (in bfloat16 the
            # rounding moves the factor by up to 0.4%, and with it about one entry in twenty).
            before, after = (torch.tensor(norm, dtype=masked.dtype) for norm in self._factor)
            if before >= _NORM_EPS and after >= _NORM_EPS:
                masked = masked * (before / after).to(masked.device)
        return masked.to(delta.dtype)

    def whole(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every pass over one block holding the whole task vector."""
        for stage in STAGES:
            self.observe(stage, tensor)
            self.end_pass(stage)
        return self.apply(tensor)

    def _thin(self, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the block in the rule's work dtype, its kept entries with the others zeroed)."""
        if self.selection is not None:
            keep = kept_by_cuts(self.selection.masks(magnitude_keys(delta)), self._difference)
            return delta, delta * keep.view(delta.shape).to(delta.dtype)
        work = delta.to(_work_dtype(delta.dtype))
        if self._draws is None:
            assert self._generator is not None, "random rules need a generator"
            self._draws = self._generator()
        if self.rule.kind == "random":
            probability = float(torch.tensor(self.rule.density, dtype=work.dtype))
            uniform = torch.rand(delta.shape, generator=self._draws)  # CPU float32
            keep = (uniform < probability).to(device=delta.device, dtype=work.dtype)
            return work, work * keep
        rows = work if work.dim() >= 2 else work.reshape(1, -1)  # (rows, n, ...)
        probabilities = della_probabilities(rows, self.rule.density, self.rule.epsilon)
        uniform = torch.rand(rows.shape, generator=self._draws).to(delta.device)  # CPU draw
        keep = (uniform < probabilities).to(work.dtype)
        return work, (rows * keep).view(delta.shape)


# -- whole tensors ------------------------------------------------------------------------------------


def magnitude(tensor: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, ⌊density · numel⌋)`` largest-magnitude entries of the whole tensor (TIES)."""
    return _whole(tensor, SparsifyRule("magnitude", density, rescale=rescale))


def magnitude_outliers(tensor: torch.Tensor, density: float, *, gamma: float = 0.01,
                       rescale: bool = False) -> torch.Tensor:
    """Drop the ``⌊gamma · n⌋`` largest magnitudes and the smallest, keeping ``⌊density · n⌋``.

    When ``density + gamma > 1`` fewer outliers go, so that ``⌊density · n⌋`` entries stay.
    """
    return _whole(tensor, SparsifyRule("magnitude_outliers", density, gamma=gamma, rescale=rescale))


def bernoulli(tensor: torch.Tensor, density: float, *, generator: torch.Generator,
              rescale: bool = False) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE).

    The probability is ``density`` rounded to the work dtype (bfloat16 for bfloat16 tensors, as in
    mergekit). Uniforms are drawn on the CPU from ``generator`` and moved to the tensor's device.
    """
    return _whole(tensor, SparsifyRule("random", density, rescale=rescale), generator)


def della_magprune(tensor: torch.Tensor, density: float, *, epsilon: float,
                   generator: torch.Generator, rescale: bool = False) -> torch.Tensor:
    """Keep entries with probabilities rising with their magnitude rank (DELLA's MagPrune).

    Needs ``0 < density ± epsilon < 1`` when ``0 < density < 1`` (checked when the recipe loads).
    """
    rule = SparsifyRule("della_magprune", density, epsilon=epsilon, rescale=rescale)
    return _whole(tensor, rule, generator)


def _whole(tensor: torch.Tensor, rule: SparsifyRule,
           generator: torch.Generator | None = None) -> torch.Tensor:
    if tensor.numel() == 0:
        return tensor
    stream = SparsifierStream(rule, shape=tuple(tensor.shape), dtype=tensor.dtype,
                              generator=None if generator is None else lambda: generator)
    return stream.whole(tensor)


def magnitude_ranks(magnitudes: torch.Tensor) -> torch.Tensor:
    """0-based ascending rank of each entry along dim 1, ties by index: int64, same shape."""
    order = torch.argsort(magnitudes, dim=1, stable=True)
    positions = torch.arange(magnitudes.shape[1], device=magnitudes.device)
    positions = positions.view(1, -1, *([1] * (magnitudes.dim() - 2))).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def della_probabilities(tensor: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """Keep probabilities ``density − ε + 2ε · (r − 1)/(n − 1)`` along dim 1, in the work dtype.

    ``r`` is the 1-based magnitude rank in its row; ranks are held in the work dtype like mergekit
    (so bfloat16 rounds ranks above 256). A row of one entry gets probability ``density``.
    """
    work = _work_dtype(tensor.dtype)
    keys = magnitude_keys(tensor).view(tensor.shape)
    ranks = magnitude_ranks(keys).to(work) + 1
    low = ranks.amin(dim=1, keepdim=True)
    high = ranks.amax(dim=1, keepdim=True)
    spread = ((ranks - low) / (high - low)).clamp(0, 1).nan_to_num(nan=0.5)
    return (density - epsilon) + spread * 2 * epsilon


def variance_top_mask(deltas: torch.Tensor, fraction: float) -> torch.Tensor:
    """SCE's selection: entries whose variance across models is among the largest ``fraction``.

    Keeps ``⌊(#entries of non-zero variance) · fraction⌋`` entries (the product in float32, as
    mergekit computes it). Picks with ``torch.topk`` on the CPU, mergekit's own choice among equal
    variances, so a CPU merge keeps exactly mergekit's entries.

    Args:
        deltas: ``(n_models, *shape)`` task vectors.
        fraction: ``select_topk`` in [0, 1].

    Returns:
        ``(*shape)`` bool mask.
    """
    shape = deltas.shape[1:]
    if fraction <= 0:
        return torch.zeros(shape, dtype=torch.bool, device=deltas.device)
    if fraction >= 1:
        return torch.ones(shape, dtype=torch.bool, device=deltas.device)
    variance = torch.var(deltas, dim=0, unbiased=False)  # (*shape)
    count = int(torch.count_nonzero(variance).cpu() * fraction)
    keep = torch.zeros(variance.numel(), dtype=torch.bool)
    if count > 0:
        keep[torch.topk(variance.abs().reshape(-1).cpu(), k=count, largest=True).indices] = True
    return keep.view(shape).to(deltas.device)
