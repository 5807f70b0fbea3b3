"""Combine LoRA adapters over one base into one adapter with PEFT's ``add_weighted_adapter``.

PEFT (the library of record) does the arithmetic; fusekit gives it a base that costs no memory.
A base on the meta device does not work with PEFT 0.21: ``add_weighted_adapter`` creates the new
adapter on its base layer's device, and every combination type then fails mixing meta and CPU
tensors (and ``from_pretrained(low_cpu_mem_usage=True)`` moves the first adapter to meta). So the
base is built on the meta device and each of its parameters replaced by a CPU placeholder of the
right shape and dtype with stride 0: one element of storage per tensor, whatever the model's size.
No combination type reads the base's values (``get_delta_weight`` uses A, B and the scaling only);
what would (DoRA's magnitudes, ``modules_to_save`` copies, biases) is refused before loading.

One deliberate difference from PEFT: for rsLoRA adapters PEFT gives the merged adapter
``lora_alpha = r`` with ``use_rslora`` still set, so it scales by ``sqrt(r)`` instead of 1; the
adapter written here says ``use_rslora: false`` and so carries exactly the combined ΔW.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fusekit.errors import CheckpointError, FusekitError
from fusekit.extras import install_hint
from fusekit.io.refs import ResolvedAdapter, ResolvedModel, require_config
from fusekit.lora.adapter_recipe import COMBINATIONS, AdapterMergeOptions

if TYPE_CHECKING:
    from torch import nn

MERGED = "merged"  # the PEFT name of the combined adapter
INSTALL_HINT = install_hint("lora")


@dataclass(frozen=True)
class CombinedAdapter:
    """The combined adapter, ready to save.

    Attributes:
        tensors: PEFT's saved keys (``base_model.model.<module>.lora_A.weight`` ...) → tensor.
        config: the ``adapter_config.json`` content.
    """

    tensors: dict[str, torch.Tensor]
    config: dict[str, Any]


def require_peft(what: str = "output: adapter") -> None:
    """Raise one line naming the ``[lora]`` extra when peft or transformers is missing."""
    for name in ("peft", "transformers"):
        try:
            __import__(name)
        except ImportError:
            raise FusekitError(f"{what} needs {name}, which is not installed; {INSTALL_HINT}") from None


def check_adapters(adapters: Sequence[ResolvedAdapter], options: AdapterMergeOptions) -> None:
    """Refuse adapters this combination cannot merge, with one line naming the adapter.

    Raises:
        CheckpointError: DoRA, ``modules_to_save`` or stored biases (PEFT's combination would carry
            base values or drop them), mixed ``target_modules`` kinds, or unequal ranks for a type
            that combines A and B factor-wise.
    """
    for adapter in adapters:
        config = adapter.config
        found = ("DoRA (use_dora)" if config.use_dora else
                 "modules_to_save" if config.modules_to_save else
                 f"bias '{config.bias}'" if config.bias != "none" else
                 "lora_bias" if config.lora_bias else None)
        if found is not None:
            raise CheckpointError(f"adapter '{adapter.ref}' uses {found}, which PEFT's adapter merge cannot "
                                  "combine; remove 'output: adapter' to merge the adapters into a full model")
    kinds = {isinstance(a.config.target_modules, str) for a in adapters}
    if len(kinds) > 1:
        odd = next(a for a in adapters if isinstance(a.config.target_modules, str))
        raise CheckpointError(f"adapter '{odd.ref}' gives target_modules as a regex and another adapter as a "
                              "list; PEFT cannot combine them: save both with the same kind")
    ranks = {a.ref: max([a.config.r, *a.config.rank_pattern.values()]) for a in adapters}
    if COMBINATIONS[options.combination].same_rank and len(adapters) > 1 and len(set(ranks.values())) > 1:
        shown = ", ".join(f"'{ref}': {rank}" for ref, rank in ranks.items())
        raise CheckpointError(f"{options.combination} needs every adapter at one rank, got {shown}; use "
                              "cat or an _svd combination type (with rank:)")


def combine_adapters(base: ResolvedModel, adapters: Sequence[ResolvedAdapter], options: AdapterMergeOptions,
                     *, seed: int, base_name: str) -> CombinedAdapter:
    """Load ``adapters`` on a placeholder of ``base`` and combine them with PEFT.

    Args:
        base: the base all adapters apply to (only its config.json is read).
        adapters: the adapters, in recipe order (aligned with ``options.weights``).
        options: the combination type and its arguments.
        seed: seeds DARE's random masks (the global RNG is left as it was).
        base_name: the ``base_model_name_or_path`` written into the new adapter's config.

    Returns:
        The combined adapter's tensors (keys as PEFT saves them) and config.

    Raises:
        CheckpointError: ``rank`` is above min(out, in) of a targeted module (named).
    """
    require_peft()
    from peft import PeftModel

    names = [f"adapter{i}" for i in range(len(adapters))]
    with warnings.catch_warnings():  # transformers' deprecation notes about PEFT's own calls
        warnings.simplefilter("ignore", FutureWarning)
        return _combine(PeftModel, names, base, adapters, options, seed=seed, base_name=base_name)


def _combine(peft_model: Any, names: list[str], base: ResolvedModel, adapters: Sequence[ResolvedAdapter],
             options: AdapterMergeOptions, *, seed: int, base_name: str) -> CombinedAdapter:
    from peft.utils import get_peft_model_state_dict

    model = peft_model.from_pretrained(placeholder_base(base), str(adapters[0].folder), adapter_name=names[0])
    for name, adapter in zip(names[1:], adapters[1:], strict=True):
        model.load_adapter(str(adapter.folder), adapter_name=name)
    if COMBINATIONS[options.combination].svd and options.rank is not None:
        _check_rank(model, options.rank)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model.add_weighted_adapter(names, list(options.weights), MERGED, combination_type=options.combination,
                                   svd_rank=options.rank, density=options.density,
                                   majority_sign_method=options.majority_sign_method,
                                   svd_full_matrices=False)
    state = get_peft_model_state_dict(model, adapter_name=MERGED)
    tensors = {key: value.detach().contiguous().clone() for key, value in sorted(state.items())}
    return CombinedAdapter(tensors=tensors, config=_config(model.peft_config[MERGED], base_name))


def placeholder_base(base: ResolvedModel) -> nn.Module:
    """``base``'s architecture from its config.json, every parameter and buffer a stride-0 CPU
    placeholder (right shape and dtype, one element of storage): enough for PEFT to attach and
    combine adapters, at no memory cost."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config_file = require_config(base, "an adapter merge builds the base's architecture from it")
    try:
        config = AutoConfig.from_pretrained(str(config_file.parent), local_files_only=True)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, OSError) as exc:
        raise CheckpointError(f"model '{base.ref}': transformers cannot build this base from "
                              f"{config_file} ({str(exc).splitlines()[0][:200]})") from None
    for module in model.modules():
        for name, param in list(module.named_parameters(recurse=False)):
            stub = torch.zeros((), dtype=param.dtype).expand(param.shape)
            module._parameters[name] = torch.nn.Parameter(stub, requires_grad=False)
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = torch.zeros((), dtype=buffer.dtype).expand(buffer.shape)
    return model


def _check_rank(model: Any, rank: int) -> None:
    """Refuse ``rank`` above min(out, in) of a module some adapter targets (the SVD could not give
    that many singular vectors)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        shape = (int(module.out_features or 0), int(module.in_features or 0))
        if rank > min(shape):
            short = name.removeprefix("base_model.model.")
            raise CheckpointError(f"rank {rank} is above min(out, in) = {min(shape)} of targeted module "
                                  f"'{short}' ({shape[0]} × {shape[1]}); use rank: {min(shape)} or less")


def _config(peft_config: Any, base_name: str) -> dict[str, Any]:
    """The merged adapter's adapter_config.json: PEFT's config of it, sets as sorted lists, the base
    named, and rsLoRA's scaling undone (``lora_alpha == r`` and plain scaling give exactly 1)."""
    raw = peft_config.to_dict()
    config = {key: sorted(value) if isinstance(value, set) else value for key, value in raw.items()}
    config["base_model_name_or_path"] = base_name
    config["inference_mode"] = True
    config["use_rslora"] = False
    return dict(sorted(config.items()))
