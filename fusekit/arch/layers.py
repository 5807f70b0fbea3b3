"""The number of blocks a config states, checked against the blocks a checkpoint's tensors hold.

A merge plans one output layer per block the config counts, selecting tensors by their block index,
so a config that counts fewer blocks than the weights hold would silently drop the rest, and one that
counts more would plan layers that do not exist. :func:`layer_count_conflict` finds both, and blocks
missing in between, before anything is planned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fusekit.arch.names import LAYER_COUNT_KEYS, block_of

# Blocks some families store after the counted ones (multi-token prediction heads, e.g. DeepSeek-V3).
EXTRA_LAYER_KEYS = ("num_nextn_predict_layers",)


def config_layer_count(config: Mapping[str, Any]) -> tuple[str, int] | None:
    """The key and value that state the number of blocks, or None when the config states none.

    Args:
        config: a model's ``config.json`` as a mapping (top level only).

    Returns:
        ``(key, count)``, e.g. ``("num_hidden_layers", 32)``, or None.

    Example:
        >>> config_layer_count({"n_layer": 12})
        ('n_layer', 12)
    """
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


def blocks_by_prefix(names: Iterable[str]) -> dict[str, set[int]]:
    """Block indices per block prefix.

    Args:
        names: tensor names.

    Returns:
        The indices found under each block prefix, e.g. ``{"model.layers": {0, 1}, "visual.blocks":
        {0}}``; names outside blocks are left out.
    """
    found: dict[str, set[int]] = {}
    for name in names:
        block = block_of(name)
        if block is not None:
            found.setdefault(block[0], set()).add(block[1])
    return found


def layer_count_conflict(config: Mapping[str, Any], names: Iterable[str]) -> str | None:
    """How the config's block count contradicts the tensor names, or None when they agree.

    Checked for every block prefix: no block index at or past the stated count (plus any extra
    blocks the config declares, see :data:`EXTRA_LAYER_KEYS`), and no index missing below the
    highest; and the highest block of all must be the last one counted. A config without a count,
    or tensors without blocks, are not checked.

    Args:
        config: the model's ``config.json`` as a mapping.
        names: every tensor name its weights hold.

    Returns:
        A clause such as ``"num_hidden_layers is 1 but the weights hold block model.layers.1"``.

    Example:
        >>> layer_count_conflict({"num_hidden_layers": 1}, ["model.layers.0.w", "model.layers.1.w"])
        'num_hidden_layers is 1 but the weights hold block model.layers.1'
    """
    stated = config_layer_count(config)
    blocks = blocks_by_prefix(names)
    if stated is None or not blocks:
        return None
    key, count = stated
    extra = sum(v for k in EXTRA_LAYER_KEYS if isinstance(v := config.get(k), int) and v > 0)
    for prefix, indices in sorted(blocks.items()):
        top = max(indices)
        if top >= count + extra:
            return f"{key} is {count} but the weights hold block {prefix}.{top}"
        missing = sorted(set(range(top + 1)) - indices)
        if missing:
            return f"the weights hold blocks {prefix}.0 to {prefix}.{top} but lack {prefix}.{missing[0]}"
    held = max(max(indices) for indices in blocks.values()) + 1
    if held < count:
        return f"{key} is {count} but the weights hold only {held} block(s)"
    return None
