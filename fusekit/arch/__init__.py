"""Knowledge of tensor names: layer indices, module roles, tied embeddings, block counts."""

from fusekit.arch.config import restack_config, text_config, text_config_key
from fusekit.arch.layers import blocks_by_prefix, config_layer_count, layer_count_conflict
from fusekit.arch.names import (
    LAYER_COUNT_KEYS,
    MODULES,
    Module,
    Role,
    block_of,
    is_embedding,
    is_lm_head,
    layer_index,
    module_of,
    role,
    with_layer_index,
)

__all__ = ["LAYER_COUNT_KEYS", "MODULES", "Module", "Role", "block_of", "blocks_by_prefix",
           "config_layer_count", "is_embedding", "is_lm_head", "layer_count_conflict", "layer_index",
           "module_of", "restack_config", "role", "text_config", "text_config_key", "with_layer_index"]
