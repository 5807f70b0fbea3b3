"""Which base tensors a LoRA adapter changes, and how, known from headers alone.

PEFT saves an adapter's tensors under the module names of the model it wrapped
(``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``). This module maps them onto
the base checkpoint's tensor names and checks, before any tensor data is read, that every ΔW has
the shape of the tensor it is added to and that each module's stored rank is the rank its config
gives. ``fusekit plan``, the memory model and :class:`fusekit.lora.apply.AdapterReader` share it.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from fusekit.errors import CheckpointError
from fusekit.io.reader import TensorInfo, read_safetensors_header
from fusekit.io.refs import ResolvedAdapter, ResolvedModel, hub_repo_id, split_revision

log = logging.getLogger("fusekit")

PEFT_PREFIX = "base_model.model."
# Suffixes PEFT gives an adapted module's tensors → (what they are, whether the module is an embedding).
LORA_SUFFIXES = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
                 ".lora_embedding_A": "EA", ".lora_embedding_B": "EB",
                 ".lora_magnitude_vector": "m", ".lora_magnitude_vector.weight": "m"}


@dataclass(frozen=True)
class LoraModule:
    """One adapted module: ΔW = scaling · B · A added to the base tensor ``target``.

    Attributes:
        module: the module's name as PEFT gives it (``model.layers.0.self_attn.q_proj``).
        target: the base tensor ΔW is added to (``model.layers.0.self_attn.q_proj.weight``).
        a / b: the adapter's tensor names of A (r, in) and B (out, r).
        embedding: an embedding LoRA (``lora_embedding_A/B``): ΔW = (B · A)ᵀ · scaling.
        fan_in_fan_out: the base stores the weight transposed (GPT-2's Conv1D).
        magnitude: DoRA's magnitude vector, or None.
        bias: lora_B's own bias (``lora_bias``), added to ``target``'s bias, or None.
        rank / scaling: as the config gives them for this module.
    """

    module: str
    target: str
    a: str
    b: str
    embedding: bool
    fan_in_fan_out: bool
    magnitude: str | None
    bias: str | None
    rank: int
    scaling: float

    @property
    def bias_target(self) -> str:
        """The base bias ``lora_bias`` adds to."""
        return self.target.removesuffix("weight") + "bias"


@dataclass(frozen=True)
class AdapterLayout:
    """How an adapter changes its base, by base tensor name.

    Attributes:
        modules: base tensor → the LoRA module adding its ΔW.
        replaced: base tensor → the adapter tensor that replaces it (``modules_to_save``, biases
            saved with ``bias: all`` / ``lora_only``, an embedding's saved ``base_layer``).
        biases: base bias → the LoRA module whose ``lora_B`` bias (times scaling) is added to it.
    """

    modules: dict[str, LoraModule]
    replaced: dict[str, str]
    biases: dict[str, LoraModule]

    def changes(self, name: str) -> bool:
        """Whether the adapter changes base tensor ``name``."""
        return name in self.modules or name in self.replaced or name in self.biases


_CACHE: dict[tuple[Path, tuple[Path, ...]], tuple[AdapterLayout, dict[str, TensorInfo]]] = {}
_CACHE_LOCK = threading.Lock()


def adapter_layout(model: ResolvedModel, base: dict[str, TensorInfo]) -> tuple[AdapterLayout,
                                                                                dict[str, TensorInfo]]:
    """Map ``model.adapter``'s tensors onto ``base`` (the base checkpoint's infos) and check them.

    Cached per (adapter weights, base files), so a plan, its memory estimate and its readers parse
    the adapter's header once; a base whose name differs from the adapter's
    ``base_model_name_or_path`` is warned about once.

    Returns:
        The layout and the adapter's own tensor infos.

    Raises:
        CheckpointError: one line naming the adapter and the tensor: ΔW of another shape than the
            base tensor, a module the base lacks, a rank other than the config's.
    """
    adapter = model.adapter
    assert adapter is not None
    key = (adapter.weights, tuple(model.weight_files))
    with _CACHE_LOCK:
        if key not in _CACHE:
            infos = read_safetensors_header(adapter.weights)[0]
            mismatch = _other_base(model)
            layout = _build(adapter, infos, base, mismatch)
            if mismatch:
                log.warning("adapter '%s' was trained on '%s' but is applied to '%s'; the shapes match, "
                            "so it is applied anyway", adapter.ref, adapter.config.base_model, model.base_ref)
            _CACHE[key] = layout, infos
        return _CACHE[key]


def _other_base(model: ResolvedModel) -> str:
    """Why the adapter's named base is not the one it is applied to ('' when it is, or unnamed)."""
    assert model.adapter is not None
    named, used = model.adapter.config.base_model, model.base_ref or model.ref
    if not named:
        return ""

    def identity(ref: str) -> str:
        repo = hub_repo_id(ref)
        if repo is not None:
            return repo.lower()
        return Path(split_revision(ref)[0].rstrip("/")).name.lower()

    return "" if identity(named) == identity(used) else f" (the adapter was trained on '{named}')"


def _build(adapter: ResolvedAdapter, infos: dict[str, TensorInfo], base: dict[str, TensorInfo],
           mismatch: str) -> AdapterLayout:
    parts: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    for name in infos:
        short = name.removeprefix(PEFT_PREFIX)
        suffix = next((s for s in LORA_SUFFIXES if short.endswith(s)), None)
        if suffix is not None:
            parts.setdefault(short.removesuffix(suffix), {})[LORA_SUFFIXES[suffix]] = name
            continue
        target = _base_name(short.replace(".base_layer.", "."), base, adapter, name)
        _check_shape(adapter, target, infos[name].shape, base[target].shape, mismatch)
        replaced[target] = name
    modules = [_module(adapter, module, found, infos, base, mismatch) for module, found in parts.items()]
    return AdapterLayout(modules={m.target: m for m in modules}, replaced=replaced,
                         biases={m.bias_target: m for m in modules if m.bias is not None})


def _module(adapter: ResolvedAdapter, module: str, found: dict[str, str], infos: dict[str, TensorInfo],
            base: dict[str, TensorInfo], mismatch: str) -> LoraModule:
    where = f"adapter '{adapter.ref}': {adapter.weights}"
    embedding = "EA" in found
    a, b = (found.get("EA"), found.get("EB")) if embedding else (found.get("A"), found.get("B"))
    if a is None or b is None:
        raise CheckpointError(f"{where}: module '{module}' has only one of lora_A / lora_B; the adapter "
                              "file is incomplete: save the adapter again")
    a_shape, b_shape = infos[a].shape, infos[b].shape
    config = adapter.config
    rank = config.rank(module)
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != rank or b_shape[1] != rank:
        raise CheckpointError(f"{where}: module '{module}' stores rank {a_shape[0] if a_shape else '?'} "
                              f"(lora_A {list(a_shape)}, lora_B {list(b_shape)}) but adapter_config.json "
                              f"gives it r={rank}; the config does not belong to these weights")
    target = _base_name(f"{module}.weight", base, adapter, a)
    fan_in_fan_out = config.fan_in_fan_out and not embedding
    delta = (b_shape[0], a_shape[1])
    if embedding or fan_in_fan_out:
        delta = delta[::-1]
    _check_shape(adapter, target, delta, base[target].shape, mismatch)
    return LoraModule(module, target, a, b, embedding, fan_in_fan_out, found.get("m"), found.get("bias"),
                      rank, config.scaling(module))


def _base_name(name: str, base: Collection[str], adapter: ResolvedAdapter, key: str) -> str:
    """The base tensor ``name`` means: itself, or without the wrapper's first component
    (``transformer.h.0…`` in the adapter, ``h.0…`` in a base saved without its head)."""
    if name in base:
        return name
    rest = name.partition(".")[2]
    if rest in base:
        return rest
    raise CheckpointError(f"adapter '{adapter.ref}': tensor '{key}' changes '{name}', which the base "
                          "does not have; apply the adapter to the model it was trained on")


def _check_shape(adapter: ResolvedAdapter, target: str, delta: tuple[int, ...], shape: tuple[int, ...],
                 mismatch: str) -> None:
    if tuple(delta) != tuple(shape):
        raise CheckpointError(f"adapter '{adapter.ref}': its update of tensor '{target}' has shape "
                              f"{list(delta)} but the base tensor has {list(shape)}{mismatch}; apply the "
                              "adapter to the model it was trained on")


def delta_bytes(model: ResolvedModel, base: dict[str, TensorInfo], name: str) -> int:
    """Extra bytes reading ``name`` through the adapter holds: ΔW in float32 (and, for DoRA, the
    whole base tensor in float32 for its norms); 0 for tensors the adapter does not add to."""
    if model.adapter is None:
        return 0
    module = adapter_layout(model, base)[0].modules.get(name)
    if module is None:
        return 0
    numel = math.prod(base[name].shape)
    return numel * 4 * (2 if module.magnitude is not None else 1)


def describe_adapter(model: ResolvedModel, base: dict[str, TensorInfo]) -> dict[str, object]:
    """What ``fusekit plan`` says about ``model.adapter``: its base, ranks, alphas, DoRA, the modules
    it adapts (count and distinct names) and the tensors it replaces (``modules_to_save``, biases).

    Example:
        >>> describe_adapter(resolve_model("base+adapter"), infos)["ranks"]  # doctest: +SKIP
        [8]
    """
    adapter = model.adapter
    assert adapter is not None
    layout = adapter_layout(model, base)[0]
    modules = list(layout.modules.values())
    config = adapter.config
    return {
        "adapter": adapter.ref, "base": model.base_ref, "trained_on": config.base_model,
        "revision": adapter.revision,
        "ranks": sorted({m.rank for m in modules}),
        "alphas": sorted({config.alpha(m.module) for m in modules}),
        "rslora": config.use_rslora, "dora": config.use_dora,
        "modules": len(modules),
        "module_names": sorted({m.module.rsplit(".", 1)[-1] for m in modules}),
        "modules_to_save": list(config.modules_to_save),
        "replaced_tensors": sorted(layout.replaced),
    }
