"""Knowledge of tensor names: layer indices, module roles, tied embeddings, block counts."""

from fusekit.arch.layers import blocks_by_prefix, config_layer_count, layer_count_conflict
from fusekit.arch.names import (
    LAYER_COUNT_KEYS,
    Role,
    block_of,
    is_embedding,
    is_lm_head,
    layer_index,
    role,
    with_layer_index,
)

__all__ = ["LAYER_COUNT_KEYS", "Role", "block_of", "blocks_by_prefix", "config_layer_count",
           "is_embedding", "is_lm_head", "layer_count_conflict", "layer_index", "role",
           "with_layer_index"]
