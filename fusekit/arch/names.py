"""What a tensor name says about its place in a transformer: layer index and module role.

Decoder checkpoints name their blocks ``<prefix>.<index>.<rest>`` with a prefix such as
``model.layers``, ``transformer.h`` or ``gpt_neox.layers``. Tensors outside the blocks are "pre"
(embeddings, read before the first block) or "post" (final norm, LM head).
"""

from __future__ import annotations

import re
from typing import Literal

Role = Literal["pre", "layer", "post"]
# mergekit's module names for multi-module (vision-language) models.
Module = Literal["text_decoder", "vision_tower", "multi_modal_projector"]
MODULES: tuple[Module, ...] = ("text_decoder", "vision_tower", "multi_modal_projector")

_LAYER = re.compile(r"^(?P<prefix>(?:.*\.)?(?:layers|h|blocks|layer|decoder\.layers))\."
                    r"(?P<index>\d+)\.(?P<rest>.+)$")
_PRE_MARKERS = ("embed", "wte", "wpe", "word_embeddings", "position_embeddings")
_LM_HEADS = ("lm_head.weight", "embed_out.weight", "output.weight")
_PROJECTOR_MARKERS = ("multi_modal_projector", "mm_projector", "visual.merger")
_VISION_MARKERS = ("vision_tower", "vision_model", "visual", "image_encoder", "vision_encoder",
                   "audio_tower", "audio_encoder")
# Config keys that hold the number of blocks, by model family.
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(name: str) -> int | None:
    """The block (layer) index a tensor name holds.

    Args:
        name: a tensor name, e.g. ``model.layers.3.mlp.up_proj.weight``.

    Returns:
        The index (3 above), or None for tensors outside the blocks (embeddings, final norm, head).

    Example:
        >>> layer_index("model.layers.3.mlp.up_proj.weight")
        3
    """
    match = _LAYER.match(name)
    return int(match.group("index")) if match else None


def block_of(name: str) -> tuple[str, int] | None:
    """The block a tensor name belongs to.

    Args:
        name: a tensor name.

    Returns:
        ``(prefix, index)`` of its block, or None for tensors outside the blocks.

    Example:
        >>> block_of("model.layers.3.mlp.up_proj.weight")
        ('model.layers', 3)
    """
    match = _LAYER.match(name)
    return (match.group("prefix"), int(match.group("index"))) if match else None


def with_layer_index(name: str, index: int) -> str:
    """A tensor name moved to another block, for stacking layers from several models.

    Args:
        name: a tensor name inside a block.
        index: the block it should belong to.

    Returns:
        ``name`` with its block index replaced by ``index``.

    Example:
        >>> with_layer_index("model.layers.3.mlp.up_proj.weight", 7)
        'model.layers.7.mlp.up_proj.weight'
    """
    match = _LAYER.match(name)
    if match is None:
        raise ValueError(f"{name!r} is not a per-layer tensor")
    return f"{match.group('prefix')}.{index}.{match.group('rest')}"


def role(name: str) -> Role:
    """Where a tensor sits in the model, which decides how slices and gradients treat it.

    Args:
        name: a tensor name.

    Returns:
        ``"layer"`` inside a block, ``"pre"`` for embeddings, ``"post"`` for the rest (final norm,
        LM head).
    """
    if layer_index(name) is not None:
        return "layer"
    if is_lm_head(name):
        return "post"
    return "pre" if any(marker in name for marker in _PRE_MARKERS) else "post"


def is_lm_head(name: str) -> bool:
    """Whether a tensor is the LM head, the output projection tied checkpoints share with the input
    embedding.

    Args:
        name: a tensor name.

    Returns:
        True for the LM head (``lm_head.weight`` and its equivalents).
    """
    return name in _LM_HEADS or name.endswith(".lm_head.weight")


def is_embedding(name: str) -> bool:
    """Whether a tensor is the input token embedding matrix.

    Args:
        name: a tensor name.

    Returns:
        True for the input embedding (``model.embed_tokens.weight`` and its equivalents).
    """
    return (role(name) == "pre" and name.endswith("weight") and "position" not in name and "wpe" not in name
            and module_of(name) == "text_decoder")


def module_of(name: str) -> Module:
    """The module of a multi-module model a tensor belongs to, in mergekit's names.

    Args:
        name: a tensor name.

    Returns:
        ``"multi_modal_projector"`` for the projector between the towers, ``"vision_tower"`` for
        the vision (or audio) encoder, and ``"text_decoder"`` for the rest: the language model,
        which is all of a plain decoder.

    Example:
        >>> module_of("model.visual.blocks.0.attn.qkv.weight")
        'vision_tower'
    """
    if any(marker in name for marker in _PROJECTOR_MARKERS):
        return "multi_modal_projector"
    if any(marker in name for marker in _VISION_MARKERS):
        return "vision_tower"
    return "text_decoder"
