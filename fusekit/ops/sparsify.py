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

from typing import Literal

import torch

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


def nth_key(keys: torch.Tensor, position: int, *, largest: bool) -> tuple[int, int]:
    """The key at ``position`` (0-based) of the sorted keys, and how many keys sort strictly before it.

    Args:
        keys: ``(numel,)`` non-negative int16 or int32 keys from :func:`magnitude_keys`.
        position: in ``[0, numel)``.
        largest: order from the largest key down instead of from the smallest up.
    """
    if keys.dtype == torch.int16:
        return _pick_from_counts(torch.bincount(keys, minlength=_HALF // 2), position, largest=largest)
    high = _high_halves(keys)
    high_key, before = _pick_from_counts(torch.bincount(high, minlength=_HALF // 2), position,
                                         largest=largest)
    low = keys[high == high_key] & (_HALF - 1)  # (entries in that bucket,)
    low_key, before_low = _pick_from_counts(torch.bincount(low, minlength=_HALF),
                                            position - before, largest=largest)
    return (high_key << 16) | low_key, before + before_low


def first_in_order(keys: torch.Tensor, count: int, *, largest: bool) -> torch.Tensor:
    """Mask of the first ``count`` keys of a stable sort (ties by index): ``(numel,)`` bool.

    ``largest`` sorts descending; equal keys still come in increasing index order, as in
    ``torch.argsort(keys, descending=largest, stable=True)[:count]``.
    """
    numel = keys.numel()
    if count <= 0:
        return torch.zeros(numel, dtype=torch.bool, device=keys.device)
    if count >= numel:
        return torch.ones(numel, dtype=torch.bool, device=keys.device)
    key, before = nth_key(keys, count - 1, largest=largest)
    mask = keys > key if largest else keys < key
    tied = (keys == key).nonzero().squeeze(1)  # (n_tied,) increasing
    mask[tied[: count - before]] = True
    return mask


# -- rescaling ----------------------------------------------------------------------------------------


def apply_mask(tensor: torch.Tensor, mask: torch.Tensor, *, rescale: bool) -> torch.Tensor:
    """``τ · mask``, times ``‖τ‖₁ / ‖τ · mask‖₁`` when ``rescale`` and both norms are ≥ 1e-7.

    ``mask`` holds 0/1 in ``tensor``'s dtype; the norms are summed in that dtype.
    """
    masked = tensor * mask
    if not rescale:
        return masked
    before = tensor.abs().sum()
    after = masked.abs().sum()
    if before < _NORM_EPS or after < _NORM_EPS:
        return masked
    return masked * (before / after)


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of mergekit's random masks on the CPU: bfloat16 stays, anything else is float32."""
    return dtype if dtype == torch.bfloat16 else torch.float32


# -- sparsifiers --------------------------------------------------------------------------------------


def magnitude(tensor: torch.Tensor, density: float, *, rescale: bool = False) -> torch.Tensor:
    """Keep the ``max(1, ⌊density · numel⌋)`` largest-magnitude entries of the whole tensor (TIES)."""
    if density >= 1:
        return tensor
    if density <= 0 or tensor.numel() == 0:
        return torch.zeros_like(tensor)
    count = max(1, int(density * tensor.numel()))
    keep = first_in_order(magnitude_keys(tensor), count, largest=True)
    return apply_mask(tensor, keep.view(tensor.shape).to(tensor.dtype), rescale=rescale)


def magnitude_outliers(tensor: torch.Tensor, density: float, *, gamma: float = 0.01,
                       rescale: bool = False) -> torch.Tensor:
    """Drop the ``⌊gamma · n⌋`` largest magnitudes and the smallest, keeping ``⌊density · n⌋``.

    When ``density + gamma > 1`` fewer outliers go, so that ``⌊density · n⌋`` entries stay.
    """
    if density >= 1:
        return tensor
    numel = tensor.numel()
    kept = int(density * numel)
    skipped = max(0, numel - kept - int(gamma * numel))
    keys = magnitude_keys(tensor)
    keep = (first_in_order(keys, skipped + kept, largest=False)
            & ~first_in_order(keys, skipped, largest=False))
    return apply_mask(tensor, keep.view(tensor.shape).to(tensor.dtype), rescale=rescale)


def bernoulli(tensor: torch.Tensor, density: float, *, generator: torch.Generator,
              rescale: bool = False) -> torch.Tensor:
    """Keep each entry with probability ``density`` (DARE).

    The probability is ``density`` rounded to the work dtype (bfloat16 for bfloat16 tensors, as in
    mergekit). Uniforms are drawn on the CPU from ``generator`` and moved to the tensor's device.
    """
    if density >= 1:
        return tensor
    work = _work_dtype(tensor.dtype)
    probability = float(torch.tensor(density, dtype=work))
    uniform = torch.rand(tensor.shape, generator=generator)  # CPU float32
    keep = (uniform < probability).to(device=tensor.device, dtype=work)
    return apply_mask(tensor.to(work), keep, rescale=rescale).to(tensor.dtype)


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


def della_magprune(tensor: torch.Tensor, density: float, *, epsilon: float,
                   generator: torch.Generator, rescale: bool = False) -> torch.Tensor:
    """Keep entries with probabilities rising with their magnitude rank (DELLA's MagPrune).

    Needs ``0 < density ± epsilon < 1`` when ``0 < density < 1`` (checked when the recipe loads).
    """
    if density >= 1:
        return tensor
    if density <= 0:
        return torch.zeros_like(tensor)
    rows = tensor if tensor.dim() >= 2 else tensor.reshape(1, -1)  # (rows, n, ...)
    work = _work_dtype(tensor.dtype)
    probabilities = della_probabilities(rows, density, epsilon)
    uniform = torch.rand(rows.shape, generator=generator).to(tensor.device)  # CPU draw
    keep = (uniform < probabilities).to(work)
    return apply_mask(rows.to(work), keep, rescale=rescale).to(tensor.dtype).view(tensor.shape)


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
