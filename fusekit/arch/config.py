"""Per-layer knowledge in ``config.json``: the language model's sub-config and lists with one entry
per layer, kept true when slices restack the layers.

A frankenmerge's output layer ``k`` comes from layer ``j`` of some source model; every per-layer
list of the output config then holds, at ``k``, that source's entry at ``j``. The keys below were
surveyed from the config classes of transformers 5 (every config whose default holds a list as long
as its layer count, and every key naming layers by index):

- :data:`PER_LAYER_KEYS`: one entry per layer (``layer_types``, ``no_rope_layers``, per-layer head
  counts, ...), remapped entry by entry;
- :data:`LAYER_INDEX_KEYS`: lists of layer indices (``mlp_only_layers``, ``moe_layers``, ...), which
  keep the output layers whose source layer was listed;
- :data:`DENSE_PREFIX_KEYS`: the number of leading dense (non-MoE) layers, recounted, refused when
  the output's dense layers no longer lead.

A vision-language config keeps its language model under ``text_config``; the same rules apply there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from fusekit.arch.names import LAYER_COUNT_KEYS
from fusekit.errors import TensorMismatchError

PER_LAYER_KEYS = (
    "layer_types", "mlp_layer_types", "indexer_types", "layers_block_type", "attention_layers",
    "attn_layers", "no_rope_layers", "sliding_windows", "layer_rope_theta", "activation_sparsity_pattern",
    "num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size",
    "expert_swiglu_limit_list", "share_expert_swiglu_limit_list",
)
LAYER_INDEX_KEYS = (
    "mlp_only_layers", "moe_layers", "full_attn_idxs", "rope_scaling_layers", "hybrid_layer_ids",
    "index_layers", "ple_layer_ids", "local_layer_ids",
)
DENSE_PREFIX_KEYS = ("first_k_dense_replace", "num_dense_layers")
# Where multi-module (vision-language, audio) configs keep their language model's settings.
TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")

# (the source model's config.json, the source layer index) for one output layer.
Origin = tuple[Mapping[str, Any], int]


def text_config_key(config: Mapping[str, Any]) -> str | None:
    """The key of the language model's sub-config, or None when the layer count is at the top.

    Example:
        >>> text_config_key({"text_config": {"num_hidden_layers": 2}, "vision_config": {}})
        'text_config'
    """
    if any(isinstance(config.get(key), int) for key in LAYER_COUNT_KEYS):
        return None
    return next((key for key in TEXT_CONFIG_KEYS if isinstance(config.get(key), dict)), None)


def text_config(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The part of ``config`` that describes the language model's layers (``config`` itself for a
    plain decoder)."""
    key = text_config_key(config)
    return config if key is None else config[key]


def restack_config(config: Mapping[str, Any], origins: Sequence[Origin]) -> dict[str, Any]:
    """``config`` for a model whose layer ``k`` comes from ``origins[k]``.

    The layer count and every per-layer key (see the module docstring) are rewritten, in the
    language model's sub-config when the config has one.

    Args:
        config: the donor's ``config.json`` (copied, not changed).
        origins: for each output layer, the source model's config and source layer index.

    Returns:
        The new config.

    Raises:
        TensorMismatchError: the output's layers cannot be described by the config (e.g. a dense
            layer stacked after an MoE one where the config counts leading dense layers).

    Example:
        >>> src = {"num_hidden_layers": 2, "layer_types": ["sliding", "full"]}
        >>> restack_config(src, [(src, 0), (src, 1), (src, 1)])["layer_types"]
        ['sliding', 'full', 'full']
    """
    result = dict(config)
    key = text_config_key(config)
    if key is not None:
        result[key] = _restack_level(config[key], [(text_config(c), j) for c, j in origins])
        return result
    return _restack_level(config, origins)


def _restack_level(config: Mapping[str, Any], origins: Sequence[Origin]) -> dict[str, Any]:
    result = dict(config)
    count_key = next((k for k in LAYER_COUNT_KEYS if k in config), "num_hidden_layers")
    result[count_key] = len(origins)
    for key in PER_LAYER_KEYS:
        if isinstance(config.get(key), list):
            result[key] = [_entry(source, key, j) for source, j in origins]
    for key in LAYER_INDEX_KEYS:
        if isinstance(config.get(key), list):
            result[key] = [k for k, (source, j) in enumerate(origins) if j in (source.get(key) or ())]
    if isinstance(config.get("decoder_sparse_step"), int) and isinstance(config.get("mlp_only_layers"), list):
        # Qwen-MoE: a layer is sparse every n-th layer unless listed; list every dense one instead.
        result["decoder_sparse_step"] = 1
        result["mlp_only_layers"] = [k for k, (source, j) in enumerate(origins)
                                     if _sparse_step_dense(source, j)]
    if isinstance(config.get("per_layer_config"), dict):
        result["per_layer_config"] = _per_layer_dict(origins)
    for key in DENSE_PREFIX_KEYS:
        if isinstance(config.get(key), int):
            result[key] = _dense_prefix(key, origins)
    return result


def _sparse_step_dense(source: Mapping[str, Any], index: int) -> bool:
    step = source.get("decoder_sparse_step") or 1
    return index in (source.get("mlp_only_layers") or ()) or (index + 1) % step != 0


def _entry(source: Mapping[str, Any], key: str, index: int) -> Any:
    values = source.get(key)
    if not isinstance(values, list) or index >= len(values):
        raise TensorMismatchError(f"config key '{key}' of a source model has no entry for its layer "
                                  f"{index}; give every model the same per-layer config keys")
    return values[index]


def _per_layer_dict(origins: Sequence[Origin]) -> dict[str, Any]:
    """``per_layer_config``: overrides keyed by zero-padded layer index, e.g. ``{"05": {...}}``."""
    result: dict[str, Any] = {}
    width = len(str(len(origins) - 1))
    for k, (source, j) in enumerate(origins):
        table = source.get("per_layer_config") or {}
        entry = next((v for name, v in table.items() if name.isdigit() and int(name) == j), None)
        if entry is not None:
            result[str(k).zfill(max(width, 2))] = entry
    return result


def _dense_prefix(key: str, origins: Sequence[Origin]) -> int:
    dense = [j < int(source.get(key) or 0) for source, j in origins]
    count = dense.index(False) if False in dense else len(dense)
    if any(dense[count:]):
        late = dense.index(True, count)
        raise TensorMismatchError(
            f"output layer {late} is a dense layer after MoE layers, but the config's '{key}' can "
            f"only describe leading dense layers; choose slices that keep dense layers first")
    return count
