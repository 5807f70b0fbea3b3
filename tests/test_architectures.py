"""Every transformers architecture merges into a config transformers loads: ties and frankenmerges.

For each decoder type this transformers has a config for (and two vision-language models), a tiny
random model (hidden 32, 3 layers, vocab 64) and a noisy copy are written once per module; each is
merged with TIES and with a passthrough frankenmerge that stacks 4 layers out of 3, and the output
is loaded back with transformers, which must find exactly the tensors it expects (no missing, extra
or misshapen ones), hold the right number of layers, and generate. The frankenmerge's per-layer
config lists must follow the source layers, and its tensors must be the source layers' bytes.

Marked ``architectures`` so CI can run this file on its own or split by ``-k``.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from fusekit.errors import FusekitError
from fusekit.merging import merge
from fusekit.recipe import parse_merge_recipe

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.architectures

LAYERS = 3
# Output layer k of the frankenmerge comes from source layer FRANKEN_SOURCES[k]: [0, 2) then [1, 3).
FRANKEN_SOURCES = [0, 1, 1, 2]
_ATTN = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": LAYERS, "num_attention_heads": 4,
         "num_key_value_heads": 2, "vocab_size": 64, "max_position_embeddings": 64}
_MOE = {"moe_intermediate_size": 16, "num_experts_per_tok": 1}
_DEEPSEEK = {**_ATTN, **_MOE, "num_key_value_heads": 4, "kv_lora_rank": 16, "qk_rope_head_dim": 8,
             "qk_nope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 2, "n_shared_experts": 1,
             "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1}
_LLAMA_TEXT = {**_ATTN, "model_type": "llama"}

# model_type -> config keyword arguments (each kept tiny).
SPECS: dict[str, dict[str, Any]] = {
    "llama": _ATTN,
    "mistral": {**_ATTN, "sliding_window": 8},
    "qwen2": {**_ATTN, "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
    "qwen3": {**_ATTN, "head_dim": 8, "use_sliding_window": True, "sliding_window": 8,
              "max_window_layers": 2},
    "gemma": {**_ATTN, "head_dim": 8},
    "gemma2": {**_ATTN, "head_dim": 8, "sliding_window": 8},
    "gemma3_text": {**_ATTN, "head_dim": 8, "sliding_window": 8,
                    "layer_types": ["sliding_attention", "full_attention", "sliding_attention"]},
    "phi": {**_ATTN, "num_key_value_heads": 4},
    "phi3": {**_ATTN, "pad_token_id": 0},
    "gpt2": {"n_embd": 32, "n_layer": LAYERS, "n_head": 4, "n_positions": 64, "vocab_size": 64},
    "gpt_neox": {**_ATTN, "tie_word_embeddings": False},
    "falcon": {"hidden_size": 32, "num_hidden_layers": LAYERS, "num_attention_heads": 4, "vocab_size": 64},
    "stablelm": _ATTN,
    "starcoder2": {**_ATTN, "sliding_window": 8},
    "olmo2": _ATTN,
    "mixtral": {**_ATTN, "num_local_experts": 2, "num_experts_per_tok": 1},
    "qwen2_moe": {**_ATTN, **_MOE, "num_experts": 2, "shared_expert_intermediate_size": 16,
                  "decoder_sparse_step": 1, "mlp_only_layers": [1]},
    "deepseek_v2": _DEEPSEEK,
    "deepseek_v3": {**_DEEPSEEK, "q_lora_rank": 16},
    "mamba": {"hidden_size": 32, "num_hidden_layers": LAYERS, "vocab_size": 64, "state_size": 4,
              "expand": 2, "conv_kernel": 2, "time_step_rank": 4},
    "llava": {"text_config": _LLAMA_TEXT, "image_token_id": 63,
              "vision_config": {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 4, "image_size": 16,
                                "patch_size": 8, "projection_dim": 32}},
    "qwen2_vl": {"text_config": {**_ATTN, "model_type": "qwen2", "rope_parameters": {
                     "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}},
                 "image_token_id": 60,
                 "video_token_id": 61, "vision_start_token_id": 62, "vision_end_token_id": 63,
                 "vision_config": {"depth": 2, "embed_dim": 32, "hidden_size": 32, "num_heads": 4,
                                   "patch_size": 4, "temporal_patch_size": 1}},
}
VISION_LANGUAGE = {"llava", "qwen2_vl"}
# Per-layer config lists checked after a frankenmerge, by where they sit in the config.
PER_LAYER_LISTS = ("layer_types", "text_config.layer_types")


def _model_class(model_type: str) -> Any:
    if model_type in VISION_LANGUAGE:
        return transformers.AutoModelForImageTextToText
    return transformers.AutoModelForCausalLM


def _build(model_type: str, folder: Path) -> None:
    """Write a random tiny model of ``model_type`` and a noisy copy, ``folder/a`` and ``folder/b``."""
    config = transformers.AutoConfig.for_model(model_type, **SPECS[model_type])
    torch.manual_seed(0)
    model = _model_class(model_type).from_config(config)
    model.save_pretrained(folder / "a")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn(param.shape, generator=generator))
    model.save_pretrained(folder / "b")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Builds each type's pair of models on first use, once per module."""
    root = tmp_path_factory.mktemp("arch")
    done: dict[str, Path] = {}

    def get(model_type: str) -> Path:
        if model_type not in done:
            _build(model_type, root / model_type)
            done[model_type] = root / model_type
        return done[model_type]

    return get


def _ties(folder: Path) -> str:
    return (f"merge_method: ties\nbase_model: {folder / 'a'}\nparameters: {{density: 0.5, weight: 0.5}}\n"
            f"models:\n  - model: {folder / 'a'}\n  - model: {folder / 'b'}\n")


def _franken(folder: Path) -> str:
    return (f"merge_method: passthrough\nslices:\n"
            f"  - sources: [{{model: {folder / 'a'}, layer_range: [0, 2]}}]\n"
            f"  - sources: [{{model: {folder / 'b'}, layer_range: [1, 3]}}]\n")


def _merge(text: str, out: Path) -> Path:
    recipe, _ = parse_merge_recipe(text, "recipe.yaml")
    merge(recipe, out, copy_tokenizer_files=False, random_seed=0)
    return out


def _load_and_generate(model_type: str, out: Path) -> Any:
    """Load ``out`` with transformers, requiring every tensor to match, and generate 3 tokens."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, info = _model_class(model_type).from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        generated = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3,
                                   do_sample=False, min_new_tokens=3, pad_token_id=0)
    assert generated.shape == (1, 7)
    return model


def _dig(config: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None  # type: ignore[assignment]
    return config


@pytest.mark.parametrize("model_type", sorted(SPECS))
def test_ties_merge_loads_and_generates(model_type: str, built: Callable[[str], Path],
                                        tmp_path: Path) -> None:
    folder = built(model_type)
    out = _merge(_ties(folder), tmp_path / "out")
    _load_and_generate(model_type, out)


@pytest.mark.parametrize("model_type", sorted(SPECS))
def test_frankenmerge_loads_generates_and_keeps_per_layer_config(
        model_type: str, built: Callable[[str], Path], tmp_path: Path) -> None:
    folder = built(model_type)
    out = _merge(_franken(folder), tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    source = json.loads((folder / "a" / "config.json").read_text())
    text = "text_config." if model_type in VISION_LANGUAGE else ""
    count_key = "n_layer" if model_type == "gpt2" else "num_hidden_layers"
    assert _dig(config, text + count_key) == len(FRANKEN_SOURCES)
    for dotted in PER_LAYER_LISTS:
        if isinstance(_dig(source, dotted), list):
            assert _dig(config, dotted) == [_dig(source, dotted)[i] for i in FRANKEN_SOURCES], dotted
    model = _load_and_generate(model_type, out)
    _check_stacked_bytes(model, folder)


def _check_stacked_bytes(model: Any, folder: Path) -> None:
    """Output layer k holds the source layer FRANKEN_SOURCES[k] (from model a for k < 2, else b);
    the final norm and head are b's (the last slice's), every other tensor (embeddings, the vision
    tower and projector) is a's."""
    from safetensors.torch import load_file

    sources = [load_file(folder / name / "model.safetensors") for name in ("a", "b")]
    merged = model.state_dict()
    checked = 0
    for name, tensor in load_file(next(iter(Path(model.name_or_path).glob("*.safetensors")))).items():
        index = _text_layer(name)
        if index is None:  # the final norm and head come from the last slice, the rest from the first
            expected = sources[1 if _is_post(name) else 0][name]
        else:
            source_name = name.replace(f".{index}.", f".{FRANKEN_SOURCES[index]}.", 1)
            expected = sources[0 if index < 2 else 1][source_name]
        assert torch.equal(tensor, expected), name
        checked += 1
    assert checked == len(merged) or checked > 0


def _is_post(name: str) -> bool:
    vision = any(marker in name for marker in ("vision", "visual", "projector"))
    return not vision and any(part in name for part in ("norm", "lm_head", "embed_out", "ln_f"))


def _text_layer(name: str) -> int | None:
    """The text-decoder layer index of a tensor name (None outside the decoder's layers)."""
    if any(marker in name for marker in ("vision", "visual")):
        return None
    for prefix in ("layers.", "h."):
        head, _, rest = name.partition(prefix)
        if rest and (head == "" or head.endswith(".")) and rest.split(".")[0].isdigit():
            return int(rest.split(".")[0])
    return None


def test_different_architectures_are_refused_unless_crimes_are_allowed(tmp_path: Path,
                                                                       built: Callable[[str], Path]) -> None:
    import shutil

    llama = built("llama")
    mistral = tmp_path / "mistral"
    shutil.copytree(llama / "b", mistral)
    config = json.loads((mistral / "config.json").read_text())
    config.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (mistral / "config.json").write_text(json.dumps(config))
    text = (f"merge_method: linear\nmodels:\n  - model: {llama / 'a'}\n    parameters: {{weight: 0.5}}\n"
            f"  - model: {mistral}\n    parameters: {{weight: 0.5}}\n")
    recipe, _ = parse_merge_recipe(text, "recipe.yaml")
    with pytest.raises(FusekitError, match="allow.crimes") as refused:
        merge(recipe, tmp_path / "out", copy_tokenizer_files=False)
    assert "llama" in str(refused.value) and "mistral" in str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "out").exists()
    merge(recipe, tmp_path / "out", copy_tokenizer_files=False, allow_crimes=True)
    assert (tmp_path / "out" / "config.json").is_file()


logging.getLogger("transformers").setLevel(logging.ERROR)
transformers.utils.logging.disable_progress_bar()


def test_modules_block_merges_the_vision_tower_whole_and_slices_the_text(
        built: Callable[[str], Path]) -> None:
    from fusekit.merging import plan_merge

    folder = built("llava")
    a, b = folder / "a", folder / "b"
    text = (f"merge_method: linear\nbase_model: {a}\nmodules:\n  text_decoder:\n    slices:\n"
            f"      - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [1, 3]}}]\n"
            f"  vision_tower:\n    models: [{{model: {a}}}, {{model: {b}}}]\n"
            f"    parameters: {{weight: 0.25}}\nparameters: {{weight: 0.5}}\n")
    plan = plan_merge(parse_merge_recipe(text, "recipe.yaml")[0])
    by_name = {task.output: task for task in plan.tasks}
    vision = [t for name, t in by_name.items() if "vision_tower" in name]
    projector = [t for name, t in by_name.items() if "multi_modal_projector" in name]
    assert vision and all(len(t.inputs) == 2 and t.method == "linear" for t in vision)
    assert all(p.weight == 0.25 for t in vision for p in t.model_params)  # type: ignore[attr-defined]
    assert projector and all(t.method == "passthrough" and len(t.inputs) == 1 for t in projector)
    layer = by_name["language_model.model.layers.1.mlp.up_proj.weight"]
    assert [i.name for i in layer.inputs] == ["language_model.model.layers.1.mlp.up_proj.weight",
                                              "language_model.model.layers.2.mlp.up_proj.weight"]
    assert plan.out_config["text_config"]["num_hidden_layers"] == 2
    assert plan.out_config["vision_config"]["num_hidden_layers"] == 2
    bad = text.replace("  vision_tower:", "  vision_towr:")
    with pytest.raises(FusekitError, match="unknown module 'vision_towr'"):
        plan_merge(parse_merge_recipe(bad, "recipe.yaml")[0])


def test_restacked_config_follows_source_layers_and_refuses_late_dense_layers() -> None:
    from fusekit.arch import restack_config

    a = {"num_hidden_layers": 3, "layer_types": ["s", "f", "s"], "mlp_only_layers": [2],
         "decoder_sparse_step": 2, "no_rope_layers": [1, 0, 1]}
    b = {**a, "layer_types": ["x", "y", "z"]}
    out = restack_config(a, [(a, 2), (b, 0), (b, 1), (a, 1)])
    assert out["num_hidden_layers"] == 4 and a["num_hidden_layers"] == 3
    assert out["layer_types"] == ["s", "x", "y", "f"] and out["no_rope_layers"] == [1, 1, 0, 0]
    # step 2: source layers 0 and 2 are dense (2 is listed, 0 is off-step); layer 1 is sparse
    assert out["decoder_sparse_step"] == 1 and out["mlp_only_layers"] == [0, 1]
    vlm = {"text_config": {"num_hidden_layers": 2, "layer_types": ["s", "f"]}, "vision_config": {"depth": 2}}
    assert restack_config(vlm, [(vlm, 1)])["text_config"] == {"num_hidden_layers": 1, "layer_types": ["f"]}
    deepseek = {"num_hidden_layers": 3, "first_k_dense_replace": 1}
    dense_first = restack_config(deepseek, [(deepseek, 0), (deepseek, 0), (deepseek, 2)])
    assert dense_first["first_k_dense_replace"] == 2
    with pytest.raises(FusekitError, match="output layer 1 is a dense layer"):
        restack_config(deepseek, [(deepseek, 1), (deepseek, 0)])
