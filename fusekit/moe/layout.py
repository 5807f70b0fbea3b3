"""Where a dense model's tensors go in each MoE output checkpoint, and its config.json.

Names follow what the installed transformers (5.x) writes with ``save_pretrained`` and reads back:
one tensor per expert and projection, which transformers fuses into its 3-D expert parameters on
load (as it does for every Mixtral, Qwen2-MoE and Qwen3-MoE checkpoint on the Hub), so the files also
load in older transformers releases and other runtimes. (mergekit-moe writes Mixtral and Qwen3-MoE
experts already fused; transformers loads both forms into the same parameters.) DeepSeek-MoE is the
layout of ``deepseek-ai/deepseek-moe-16b``, whose modelling code lives on the Hub (``auto_map``), as
mergekit-moe writes it.

==================  ==================================  ==========================  ==========================
dense (Llama...)    mixtral                             qwen2_moe / qwen3_moe       deepseek
==================  ==================================  ==========================  ==========================
mlp.gate_proj       block_sparse_moe.experts.{e}.w1     mlp.experts.{e}.gate_proj   mlp.experts.{e}.gate_proj
mlp.up_proj         block_sparse_moe.experts.{e}.w3     mlp.experts.{e}.up_proj     mlp.experts.{e}.up_proj
mlp.down_proj       block_sparse_moe.experts.{e}.w2     mlp.experts.{e}.down_proj   mlp.experts.{e}.down_proj
(router) [E, H]     block_sparse_moe.gate               mlp.gate                    mlp.gate
(shared expert)     -                                   mlp.shared_expert.{proj},   mlp.shared_experts.{proj}
                                                        mlp.shared_expert_gate
                                                        [1, H] (qwen2_moe only)
==================  ==================================  ==========================  ==========================
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
# Dense model families each output architecture can hold: same attention, norms and MLP shape
# (mergekit-moe accepts the same families).
SOURCE_TYPES = {"mixtral": ("llama", "mistral"), "qwen2_moe": ("llama", "mistral", "qwen2"),
                "qwen3_moe": ("qwen3",), "deepseek": ("llama", "mistral")}
# Outputs whose shared expert passes through ``sigmoid(shared_expert_gate · x)``; DeepSeek-MoE adds
# its shared expert ungated.
GATED_SHARED = ("qwen2_moe",)
# Where DeepSeek-MoE's modelling code lives (the Hub repository mergekit-moe also points to).
DEEPSEEK_CODE = "deepseek-ai/deepseek-moe-16b-base--"
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
        raise TensorMismatchError(f"tensor '{name}': MLP biases have no place in an MoE expert "
                                  "(Mixtral, Qwen-MoE and DeepSeek-MoE experts have none); use models "
                                  "without MLP biases")
    return MlpTensor(name, int(match.group("layer")), match.group("part"))


def expert_name(architecture: str, layer: int, expert: int, part: str) -> str:
    if architecture == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{_MIXTRAL_PART[part]}.weight"
    return f"model.layers.{layer}.mlp.experts.{expert}.{part}.weight"


def shared_expert_name(architecture: str, layer: int, part: str) -> str:
    module = "shared_experts" if architecture == "deepseek" else "shared_expert"
    return f"model.layers.{layer}.mlp.{module}.{part}.weight"


def router_name(architecture: str, layer: int) -> str:
    if architecture == "mixtral":
        return f"model.layers.{layer}.block_sparse_moe.gate.weight"
    return f"model.layers.{layer}.mlp.gate.weight"


def shared_gate_name(layer: int) -> str:
    return f"model.layers.{layer}.mlp.shared_expert_gate.weight"


def check_attention(architecture: str, base: str, names: list[str]) -> bool:
    """Whether the output's attention has biases; errors for biases the output cannot hold.

    Mixtral holds none; Qwen2-MoE holds q/k/v biases only; Qwen3-MoE and DeepSeek-MoE hold biases
    on all four projections or none (their ``attention_bias``).
    """
    o_bias = next((n for n in names if n.endswith("self_attn.o_proj.bias")), None)
    qkv = [n for n in names if re.search(r"self_attn\.[qkv]_proj\.bias$", n)]
    if architecture == "mixtral" and (qkv or o_bias):
        raise TensorMismatchError(f"model '{base}' has attention biases ('{qkv[0] if qkv else o_bias}'), "
                                  "which Mixtral cannot hold; use architecture: qwen2_moe (with a "
                                  "shared expert) or a base without biases")
    if architecture == "qwen2_moe":
        if o_bias:
            raise TensorMismatchError(f"model '{base}' has an output-projection bias ('{o_bias}'), "
                                      "which Qwen2-MoE cannot hold; use a base without it")
        return bool(qkv)
    if bool(qkv) != bool(o_bias):
        have = qkv[0] if qkv else o_bias
        raise TensorMismatchError(f"model '{base}' has attention bias '{have}' but not on every "
                                  f"projection; {architecture} has biases on q, k, v and o or on none")
    return bool(qkv)


def output_config(architecture: str, base_config: dict[str, Any], *, experts: int, per_token: int,
                  attention_bias: bool, shared: int, shared_intermediate: int | None,
                  dtype: str) -> dict[str, Any]:
    """config.json of the MoE: the base's shapes and settings plus the expert keys.

    Args:
        architecture: one of :data:`fusekit.moe.recipe.ARCHITECTURES`.
        base_config: the dense base's config.json.
        experts / per_token: routed experts per layer, and how many each token uses.
        attention_bias: whether the attention projections have biases (see :func:`check_attention`).
        shared: shared experts (0 or 1).
        shared_intermediate: the shared expert's MLP width.
        dtype: the output dtype's name.

    Returns:
        The config as a dict, ready for ``config.json``.
    """
    config = {k: base_config[k] for k in _CARRIED_KEYS if k in base_config}
    layers = int(base_config["num_hidden_layers"])
    common = {"num_experts_per_tok": per_token, "output_router_logits": False,
              "router_aux_loss_coef": 0.001}
    if architecture == "mixtral":
        config.update({
            "architectures": ["MixtralForCausalLM"], "model_type": "mixtral", **common,
            "num_local_experts": experts, "sliding_window": base_config.get("sliding_window"),
            "router_jitter_noise": 0.0,
        })
    elif architecture == "deepseek":
        config.update(_deepseek_keys(base_config, experts=experts, per_token=per_token,
                                     attention_bias=attention_bias, shared=shared))
    else:
        config.update({
            "num_experts": experts, **common, "norm_topk_prob": True,
            "moe_intermediate_size": base_config["intermediate_size"], "decoder_sparse_step": 1,
            "mlp_only_layers": [], "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": layers,
        })
        config.update({"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe",
                       "shared_expert_intermediate_size": shared_intermediate, "qkv_bias": attention_bias,
                       "layer_types": ["full_attention"] * layers} if architecture == "qwen2_moe" else
                      {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
                       "attention_bias": attention_bias})
    config["dtype"] = dtype
    return config


def _deepseek_keys(base_config: dict[str, Any], *, experts: int, per_token: int, attention_bias: bool,
                   shared: int) -> dict[str, Any]:
    """DeepSeek-MoE's keys, as mergekit-moe writes them: every layer an MoE layer, softmax routing."""
    rope = base_config.get("rope_parameters") or {}
    code = {"AutoConfig": f"{DEEPSEEK_CODE}configuration_deepseek.DeepseekConfig",
            "AutoModel": f"{DEEPSEEK_CODE}modeling_deepseek.DeepseekModel",
            "AutoModelForCausalLM": f"{DEEPSEEK_CODE}modeling_deepseek.DeepseekForCausalLM"}
    return {
        "architectures": ["DeepseekForCausalLM"], "model_type": "deepseek", "auto_map": code,
        "n_routed_experts": experts, "n_shared_experts": shared or None, "num_experts_per_tok": per_token,
        "first_k_dense_replace": 0, "moe_layer_freq": 1, "scoring_func": "softmax",
        "norm_topk_prob": True, "moe_intermediate_size": base_config["intermediate_size"],
        "attention_bias": attention_bias, "aux_loss_alpha": 0.001, "seq_aux": True,
        # DeepSeek's code reads the RoPE base from rope_theta, not transformers 5's rope_parameters.
        "rope_theta": base_config.get("rope_theta", rope.get("rope_theta", 10000.0)),
        "rope_scaling": base_config.get("rope_scaling"),
    }
