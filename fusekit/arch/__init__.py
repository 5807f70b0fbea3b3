"""Knowledge of tensor names: layer indices, module roles, tied embeddings."""

from fusekit.arch.names import (
    LAYER_COUNT_KEYS,
    Role,
    is_embedding,
    is_lm_head,
    layer_index,
    role,
    with_layer_index,
)

__all__ = ["LAYER_COUNT_KEYS", "Role", "is_embedding", "is_lm_head", "layer_index", "role",
           "with_layer_index"]
