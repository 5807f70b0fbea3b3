"""Where a dense model's tensors go in a Mixtral or Qwen2-MoE checkpoint, and its config.json.

Names follow what the installed transformers (5.x) writes with ``save_pretrained`` and reads back:
one tensor per expert and projection, which transformers fuses into its 3-D expert parameters on
load (as it does for every Mixtral and Qwen2-MoE checkpoint on the Hub), so the files also load in
older transformers releases and other runtimes.

========================  ==========================================  =====================================
dense (Llama/Mistral)     mixtral                                     qwen2_moe
========================  ==========================================  =====================================
mlp.gate_proj.weight      block_sparse_moe.experts.{e}.w1.weight      mlp.experts.{e}.gate_proj.weight
mlp.up_proj.weight        block_sparse_moe.experts.{e}.w3.weight      mlp.experts.{e}.up_proj.weight
mlp.down_proj.weight      block_sparse_moe.experts.{e}.w2.weight      mlp.experts.{e}.down_proj.weight
(router)                  block_sparse_moe.gate.weight [E, H]         mlp.gate.weight [E, H]
(shared expert)           -                                           mlp.shared_expert.{proj}.weight,
                                                                      mlp.shared_expert_gate.weight [1, H]
========================  ==========================================  =====================================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from fusekit.errors import TensorMismatchError

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
_DENSE_MLP = re.compile(r"^(?P<prefix>model\.layers\.(?P<layer>\d+)\.)mlp\.(?P<part>gate_proj|up_proj|"
                        r"down_proj)\.(?P<kind>weight|bias)$")
_MIXTRAL_PART = {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}
# Dense model families each output architecture can hold: same attention, norms and MLP shape.
SOURCE_TYPES = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2")}
# Keys of the dense config.json carried into the MoE config unchanged.
_CARRIED_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "initializer_range",
    "rms_norm_eps", "use_cache", "pad_token_id", "bos_token_id", "eos_token_id",
    "tie_word_embeddings", "rope_parameters", "rope_theta", "rope_scaling", "attention_dropout",
)


@dataclass(frozen=True)
class MlpTensor:
    """One projection of one layer's dense MLP."""

    name: str
    layer: int
    part: str


def dense_mlp_tensor(name: str) -> MlpTensor | None:
    """The MLP projection ``name`` is, or None for every other tensor."""
    match = _DENSE_MLP.match(name)
    if match is None:
        return None
    if match.group("kind") == "bias":
        raise TensorMismatchError(f"tensor '{name}': MLP biases have no place in a Mixtral or "
                                  "Qwen2-MoE expert; use models without MLP biases")
    return MlpTensor(name, int(match.group("layer")), match.group("part"))


def expert_name(architecture: str, layer: int, expert: int, part: str) -> str:
    if architecture == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_PART[part]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{part}.weight"


def shared_expert_name(layer: int, part: str) -> str:
    return f"model.layers.{layer}.mlp.shared_expert.{part}.weight"


def router_name(architecture: str, layer: int) -> str:
    if architecture == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"
    return f"model.layers.{layer}.mlp.gate.weight"


def shared_gate_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def check_attention(architecture: str, base: str, names: list[str]) -> bool:
    """Whether the output needs q/k/v biases; errors for tensors the output cannot hold."""
    o_bias = next((n for n in names if n.endswith("self_attn.o_proj.bias")), None)
    qkv = [n for n in names if re.search(r"self_attn\.[qkv]_proj\.bias$", n)]
    if architecture == "mixtral" and (qkv or o_bias):
        raise TensorMismatchError(f"model '{base}' has attention biases ('{qkv[0] if qkv else o_bias}'), "
                                  "which Mixtral cannot hold; use architecture: qwen2_moe (with a "
                                  "shared expert) or a base without biases")
    if o_bias:
        raise TensorMismatchError(f"model '{base}' has an output-projection bias ('{o_bias}'), "
                                  "which Qwen2-MoE cannot hold; use a base without it")
    return bool(qkv)


def output_config(architecture: str, base_config: dict[str, Any], *, experts: int, per_token: int,
                  qkv_bias: bool, shared_intermediate: int | None, dtype: str) -> dict[str, Any]:
    """config.json of the MoE: the base's shapes and settings plus the expert keys."""
    config = {k: base_config[k] for k in _CARRIED_KEYS if k in base_config}
    layers = int(base_config["num_hidden_layers"])
    if architecture == "mixtral":
        config.update({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "num_local_experts": experts, "num_experts_per_tok": per_token,
            "sliding_window": base_config.get("sliding_window"),
            "output_router_logits": False, "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0,
        })
    else:
        config.update({
            "architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
            "num_experts": experts, "num_experts_per_tok": per_token, "norm_topk_prob": True,
            "moe_intermediate_size": base_config["intermediate_size"],
            "shared_expert_intermediate_size": shared_intermediate,
            "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": qkv_bias,
            "use_sliding_window": False, "sliding_window": None, "max_window_layers": layers,
            "layer_types": ["full_attention"] * layers,
            "output_router_logits": False, "router_aux_loss_coef": 0.001,
        })
    config["dtype"] = dtype
    return config
