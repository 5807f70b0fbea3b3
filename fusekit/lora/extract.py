"""``fusekit lora extract``: a PEFT LoRA adapter that approximates a fine-tune's difference from its base.

For every 2-D weight inside the transformer blocks whose values differ between ``base`` and
``model``, ΔW = W_model − W_base (computed in float32) is factored by a truncated SVD
(:mod:`fusekit.lora.svd`) as ``ΔW ≈ B @ A`` with ``B = U·√S`` ``(out, r)`` and ``A = √S·Vᵀ``
``(r, in)``: the singular values are split evenly between the factors, as PiSSA and mergekit do, so
both have the same scale when the adapter is trained further. ``lora_alpha = r`` (scaling 1);
with ``energy`` each module gets the smallest rank whose squared singular values hold that share of
‖ΔW‖²_F (at most ``max_rank``), written as PEFT's ``rank_pattern`` / ``alpha_pattern``.

The input embedding and the LM head are saved whole as ``modules_to_save`` (``embeddings="full"``,
the default), factored like the rest (``"lora"``; the embedding as PEFT's ``lora_embedding_A/B`` of
ΔEᵀ), or left out (``"skip"``). Tied embeddings (no head tensor) get a matching head entry, so the
output side changes as the fine-tune's did. Norm modules (only 1-D weights) that differ are saved
whole as ``modules_to_save`` (``norms="save"``, the default), so a full-rank adapter reproduces the
fine-tune exactly; biases of linear modules and other tensors an adapter does not hold are named in
a warning when they differ. Modules whose weights are exactly equal are skipped.

Tensors are read one module pair at a time (no file is memory-mapped) and each module's need is
checked against ``max_memory`` from the headers before anything is read. The output folder is
claimed and written atomically (:mod:`fusekit.io.outputs`): a failed run leaves nothing.

Example:
    >>> result = extract_lora("org/base", "org/fine-tune", "adapter", rank=16)  # doctest: +SKIP
    >>> round(result.total_relative_error, 3)  # doctest: +SKIP
    0.412
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from fusekit.arch.names import is_embedding, is_lm_head, layer_index
from fusekit.device import resolve_device
from fusekit.errors import FusekitError, TensorMismatchError
from fusekit.io.files import write_json, write_text
from fusekit.io.layout import SINGLE_FILE, TensorSpec
from fusekit.io.outputs import claim_output, model_inputs
from fusekit.io.reader import CheckpointReader
from fusekit.io.refs import hub_repo_id, resolve_model
from fusekit.io.writer import ShardWriter, atomic_output
from fusekit.lora.svd import SvdMethod, energy_rank, sketch_size, truncated_svd, use_randomized
from fusekit.plan.build import read_config
from fusekit.plan.report import human_bytes
from fusekit.version import __version__

log = logging.getLogger("fusekit")

Embeddings = Literal["full", "lora", "skip"]
Norms = Literal["save", "skip"]
Kind = Literal["linear", "embedding", "full"]
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's key prefix for a causal LM adapter
TIED_HEAD = "lm_head"


@dataclass(frozen=True)
class ExtractOptions:
    """How to extract: exactly one of ``rank`` and ``energy``; the rest have defaults.

    Attributes:
        rank: the same rank for every factored module.
        energy: share of ‖ΔW‖²_F each module's rank must hold, in ``(0, 1]``.
        max_rank: the largest rank ``energy`` may pick (default: ``min(out, in)``).
        embeddings: ``full`` (modules_to_save), ``lora`` (factored) or ``skip``.
        norms: ``save`` (differing norm modules as modules_to_save) or ``skip``.
        svd: ``auto`` (randomized where it is faster), ``exact`` or ``randomized``.
        device: where the SVDs run: ``cpu``, ``cuda`` or ``auto``.
        max_memory: bytes one module may need; a larger need is refused before any work.
        overwrite: replace a previous adapter in the output folder.
        allow_pickle: accept ``.bin`` checkpoints.
    """

    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    embeddings: Embeddings = "full"
    norms: Norms = "save"
    svd: SvdMethod = "auto"
    device: str = "cpu"
    max_memory: int = 4 * 10**9
    overwrite: bool = False
    allow_pickle: bool = False

    def __post_init__(self) -> None:
        if (self.rank is None) == (self.energy is None):
            raise FusekitError("give exactly one of --rank (the same rank everywhere) and --energy "
                               "(a rank per module from its singular values)")
        if self.rank is not None and self.rank < 1:
            raise FusekitError(f"--rank {self.rank}: must be 1 or more")
        if self.energy is not None and not 0 < self.energy <= 1:
            raise FusekitError(f"--energy {self.energy}: must be above 0 and at most 1, e.g. 0.9")
        if self.max_rank is not None and (self.energy is None or self.max_rank < 1):
            raise FusekitError(f"--max-rank {self.max_rank}: goes with --energy and must be 1 or more; "
                               "with --rank, the rank is already fixed")


@dataclass(frozen=True)
class Target:
    """One module to extract: its PEFT module name, the tensor it comes from and how it is stored."""

    module: str
    tensor: str
    shape: tuple[int, ...]  # (out, in) of a factored module; the tensor's shape when saved whole
    kind: Kind
    tied_head: bool = False  # also write the tied LM head from this embedding


@dataclass
class ModuleResult:
    """What extraction did with one module: ``error`` and ``norm`` are ‖ΔW − BA‖_F and ‖ΔW‖_F."""

    module: str
    shape: tuple[int, ...]
    kind: str  # lora | embedding | full | same
    rank: int = 0
    method: str = ""
    norm: float = 0.0
    error: float = 0.0

    @property
    def relative_error(self) -> float:
        return self.error / self.norm if self.norm else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"module": self.module, "shape": list(self.shape), "kind": self.kind, "rank": self.rank,
                "method": self.method, "norm": self.norm, "relative_error": self.relative_error}


@dataclass
class ExtractResult:
    """An extraction's outcome: per-module results, tensors left out, time taken."""

    out_dir: Path
    modules: list[ModuleResult]
    not_carried: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def total_relative_error(self) -> float:
        """‖ΔW − BA‖_F / ‖ΔW‖_F over every extracted module together."""
        norm = math.sqrt(sum(m.norm ** 2 for m in self.modules))
        return math.sqrt(sum(m.error ** 2 for m in self.modules)) / norm if norm else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "modules": [m.as_dict() for m in self.modules],
                "total_relative_error": self.total_relative_error, "not_carried": self.not_carried,
                "seconds": self.seconds}


def extract_lora(base: str, model: str, out_dir: str | Path, **options: Any) -> ExtractResult:
    """Extract a LoRA adapter from a fine-tune and its base and write it to ``out_dir``.

    Args:
        base: the base model reference (local folder or Hub id), also written as the adapter's
            ``base_model_name_or_path``.
        model: the fine-tuned model reference; it must have the base's tensor names and shapes.
        out_dir: the PEFT adapter folder to write (``adapter_config.json``,
            ``adapter_model.safetensors``, ``README.md``).
        **options: the fields of :class:`ExtractOptions` (``rank=`` or ``energy=``, ...).

    Returns:
        Per-module ranks and relative Frobenius errors, and their total.

    Raises:
        FusekitError: one line for a user mistake (no module differs, shapes differ, a rank above
            ``min(out, in)``, a module needing more than ``max_memory``); nothing is written then.

    Example:
        >>> extract_lora("base", "tuned", "adapter", energy=0.9, max_rank=64)  # doctest: +SKIP
    """
    opts = ExtractOptions(**options)
    start = time.perf_counter()
    device = resolve_device(opts.device)
    resolved = [resolve_model(ref, allow_pickle=opts.allow_pickle) for ref in (base, model)]
    with CheckpointReader(resolved[0]) as base_reader, CheckpointReader(resolved[1]) as model_reader:
        targets, others = plan_targets(base_reader, model_reader, opts)
        with claim_output(out_dir, inputs=model_inputs(resolved), overwrite=opts.overwrite,
                          markers=(ADAPTER_CONFIG,)) as out:
            results, factors = [], {}
            for target in targets:
                result, tensors = extract_module(target, base_reader, model_reader, opts, device)
                results.append(result)
                factors.update(tensors)
            _check_something_differs(results, base, model)
            not_carried = differing(others, base_reader, model_reader)
            if not_carried:
                log.warning("%d tensor(s) differ but the adapter does not hold them (biases, norms with "
                            "--norms skip, ...), "
                            "e.g. '%s'; the adapter leaves them as in the base", len(not_carried),
                            not_carried[0])
            with atomic_output(out, overwrite=opts.overwrite) as temp:
                _write_weights(temp, targets, results, factors, model_reader)
                write_json(temp / ADAPTER_CONFIG, adapter_config(base, targets, results, base_reader))
                write_text(temp / "README.md", adapter_card(base, model, out.name, results, opts))
    return ExtractResult(Path(out_dir), results, not_carried, time.perf_counter() - start)


# --- planning (headers only) ------------------------------------------------------------------------


def plan_targets(base: CheckpointReader, model: CheckpointReader,
                 opts: ExtractOptions) -> tuple[list[Target], list[str]]:
    """The modules to extract, and the other tensors (compared later only to warn).

    Raises:
        TensorMismatchError: a tensor is missing from one model, or its shape differs.
        FusekitError: ``--rank`` above ``min(out, in)`` of a module, or a module needing more
            memory than ``--max-memory``.
    """
    _check_same_tensors(base, model)
    targets: list[Target] = []
    others: list[str] = []
    tied = _has_tied_head(base)
    norms = norm_modules(model.infos) if opts.norms == "save" else set()
    for name, info in model.infos.items():
        target = _target(name, info.shape, opts.embeddings, tied, norms)
        if target is None:
            others.append(name)
        else:
            targets.append(target)
    for target in targets:
        _check_rank(target, opts)
        _check_memory(target, base, model, opts)
    return targets, others


def _target(name: str, shape: tuple[int, ...], embeddings: Embeddings, tied: bool,
            norms: set[str]) -> Target | None:
    """How one tensor is extracted, or None for a tensor the adapter does not carry."""
    module = name.rsplit(".", 1)[0]
    if module in norms:
        return Target(module, name, shape, "full")
    kind = _kind(name, shape, embeddings)
    if kind is None:
        return None
    if kind == "embedding":
        return Target(module, name, (shape[1], shape[0]), kind, tied_head=tied)
    return Target(module, name, shape, kind, tied_head=tied and kind == "full" and is_embedding(name))


def norm_modules(infos: dict[str, Any]) -> set[str]:
    """Modules holding only 1-D ``weight`` / ``bias`` tensors (RMSNorm, LayerNorm): saved whole."""
    shapes: dict[str, list[tuple[str, int]]] = {}
    for name, info in infos.items():
        module, _, leaf = name.rpartition(".")
        shapes.setdefault(module, []).append((leaf, len(info.shape)))
    return {m for m, leaves in shapes.items() if m and all(leaf in ("weight", "bias") and dims == 1
                                                           for leaf, dims in leaves)}


def _kind(name: str, shape: tuple[int, ...], embeddings: Embeddings) -> Kind | None:
    """How a tensor is extracted, or None for tensors an adapter does not carry."""
    if len(shape) != 2 or not name.endswith(".weight"):
        return None
    if layer_index(name) is not None:
        return "linear"
    if not (is_embedding(name) or is_lm_head(name)) or embeddings == "skip":
        return None
    if embeddings == "full":
        return "full"
    return "embedding" if is_embedding(name) else "linear"


def _has_tied_head(base: CheckpointReader) -> bool:
    """True when the base stores no LM head because it reuses the input embedding."""
    return (not any(is_lm_head(n) for n in base.infos)
            and bool(read_config(base.model).get("tie_word_embeddings")))


def _check_same_tensors(base: CheckpointReader, model: CheckpointReader) -> None:
    for name in model.infos:
        if name not in base.infos:
            raise TensorMismatchError(f"tensor '{name}' of --model '{model.model.ref}' is missing from "
                                      f"--base '{base.model.ref}'; extract from a fine-tune of this base")
        if model.infos[name].shape != base.infos[name].shape:
            raise TensorMismatchError(
                f"tensor '{name}' has shape {list(model.infos[name].shape)} in --model "
                f"'{model.model.ref}' but {list(base.infos[name].shape)} in --base '{base.model.ref}'; "
                "extract from a fine-tune of this base (resized vocabularies are not supported)")
    missing = [n for n in base.infos if n not in model.infos]
    if missing:
        raise TensorMismatchError(f"tensor '{missing[0]}' of --base '{base.model.ref}' is missing from "
                                  f"--model '{model.model.ref}'; extract from a fine-tune of this base")


def _check_rank(target: Target, opts: ExtractOptions) -> None:
    limit = min(target.shape)
    if target.kind != "full" and opts.rank is not None and opts.rank > limit:
        raise FusekitError(f"--rank {opts.rank} is above min(out, in) = {limit} of module "
                           f"'{target.module}' ({target.shape[0]}x{target.shape[1]}); choose --rank "
                           f"{limit} or less, or --energy to pick a rank per module")


def module_rank_cap(target: Target, opts: ExtractOptions) -> int:
    """The largest rank a module may get: ``--rank``, or ``--max-rank`` / ``min(out, in)``."""
    limit = min(target.shape)
    wanted = opts.rank if opts.rank is not None else (opts.max_rank or limit)
    return min(wanted, limit)


def svd_method(target: Target, opts: ExtractOptions) -> Literal["exact", "randomized"]:
    """``exact`` or ``randomized``: what :func:`fusekit.lora.svd.truncated_svd` will run."""
    rank = module_rank_cap(target, opts)
    k = min(target.shape)
    if opts.svd == "exact" or sketch_size(rank, k) >= k:
        return "exact"
    faster = use_randomized((target.shape[0], target.shape[1]), rank)
    return "randomized" if opts.svd == "randomized" or faster else "exact"


def module_memory(target: Target, base: CheckpointReader, model: CheckpointReader,
                  opts: ExtractOptions) -> int:
    """Bytes one module holds at most: both tensors as read, ΔW in float32 and the SVD's work."""
    held = base.info(target.tensor).nbytes + model.info(target.tensor).nbytes
    if target.kind == "full":
        return held + 4 * math.prod(target.shape)
    m, n = target.shape
    k = min(m, n)
    if svd_method(target, opts) == "exact":  # input copy, U, Vᵀ and LAPACK's k² workspace
        work = m * n + k * (m + n) + 4 * k * k
    else:  # sketch, its orthonormal bases and Qᵀ ΔW
        q = sketch_size(module_rank_cap(target, opts), k)
        work = 2 * q * (m + n) + q * n + q * q
    return held + 4 * (m * n + work)


def _check_memory(target: Target, base: CheckpointReader, model: CheckpointReader,
                  opts: ExtractOptions) -> None:
    need = module_memory(target, base, model, opts)
    if need > opts.max_memory:
        raise FusekitError(
            f"module '{target.module}' ({'x'.join(map(str, target.shape))}, {svd_method(target, opts)} "
            f"SVD) needs about {human_bytes(need)}, above --max-memory {human_bytes(opts.max_memory)}; "
            f"raise --max-memory to {human_bytes(need)} or more, or use a smaller rank")


# --- extraction (one module at a time) ----------------------------------------------------------------


def extract_module(target: Target, base: CheckpointReader, model: CheckpointReader, opts: ExtractOptions,
                   device: torch.device) -> tuple[ModuleResult, dict[str, torch.Tensor]]:
    """Read one module pair and factor its difference; return its result and the tensors to write.

    ``full`` modules return no tensors: they are read again when the adapter is written.
    """
    base_w, model_w = base.get(target.tensor), model.get(target.tensor)
    if torch.equal(base_w, model_w):
        return ModuleResult(target.module, target.shape, "same"), {}
    compute = torch.float64 if model_w.dtype == torch.float64 else torch.float32
    delta = model_w.to(device, compute) - base_w.to(device, compute)
    out_dtype = model_w.dtype
    del base_w, model_w
    if target.kind == "embedding":
        delta = delta.T  # PEFT's embedding LoRA factors ΔEᵀ: (hidden, vocab) = B (hidden, r) @ A (r, vocab)
    norm = float(delta.norm())
    if target.kind == "full":
        return ModuleResult(target.module, target.shape, "full", norm=norm), {}
    method = svd_method(target, opts)
    u, s, vh = truncated_svd(delta, module_rank_cap(target, opts), method=method,
                             generator=_generator(target.module))
    rank = module_rank_cap(target, opts) if opts.energy is None else energy_rank(
        s, norm ** 2, opts.energy, module_rank_cap(target, opts))
    root = s[:rank].sqrt()
    lora_b = (u[:, :rank] * root).to(out_dtype)  # (out, r)
    lora_a = (root[:, None] * vh[:rank]).to(out_dtype)  # (r, in)
    error = float(delta.addmm_(lora_b.to(compute), lora_a.to(compute), alpha=-1).norm())
    kind = "embedding" if target.kind == "embedding" else "lora"
    result = ModuleResult(target.module, target.shape, kind, rank, method, norm, error)
    return result, dict(_factor_tensors(target, lora_a.cpu(), lora_b.cpu()))


def _factor_tensors(target: Target, lora_a: torch.Tensor,
                    lora_b: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    """PEFT's keys for one module's factors (and the tied head's, which are their transposes)."""
    if target.kind == "embedding":
        yield f"{PREFIX}{target.module}.lora_embedding_A", lora_a.contiguous()
        yield f"{PREFIX}{target.module}.lora_embedding_B", lora_b.contiguous()
        if target.tied_head:  # head ΔW = ΔE = Aᵀ Bᵀ: lora_A = Bᵀ (r, hidden), lora_B = Aᵀ (vocab, r)
            yield f"{PREFIX}{TIED_HEAD}.lora_A.weight", lora_b.T.contiguous()
            yield f"{PREFIX}{TIED_HEAD}.lora_B.weight", lora_a.T.contiguous()
        return
    yield f"{PREFIX}{target.module}.lora_A.weight", lora_a.contiguous()
    yield f"{PREFIX}{target.module}.lora_B.weight", lora_b.contiguous()


def _generator(module: str) -> torch.Generator:
    """The randomized SVD's generator for one module: the same draw on every run and device."""
    digest = hashlib.sha256(f"lora-extract/{module}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def differing(names: list[str], base: CheckpointReader, model: CheckpointReader) -> list[str]:
    """Which of ``names`` hold other values in ``model`` than in ``base`` (read one at a time)."""
    return [name for name in names if not torch.equal(base.get(name), model.get(name))]


def _check_something_differs(results: list[ModuleResult], base: str, model: str) -> None:
    if all(r.kind == "same" for r in results):
        raise FusekitError(f"no module of --model '{model}' differs from --base '{base}'; there is "
                           "nothing to extract (check that --model is the fine-tune)")
    if all(r.kind in ("same", "full") for r in results):
        raise FusekitError("only the embeddings, LM head or norms differ and they are saved whole, so "
                           "the adapter would have no LoRA module; use --embeddings lora")


# --- writing -------------------------------------------------------------------------------------------


def _write_weights(folder: Path, targets: list[Target], results: list[ModuleResult],
                   factors: dict[str, torch.Tensor], model: CheckpointReader) -> None:
    """``adapter_model.safetensors``: the factors, then each ``full`` module read again from ``model``."""
    whole: dict[str, str] = {}  # output key -> tensor to copy
    for target, result in zip(targets, results, strict=True):
        if result.kind == "full":
            whole[f"{PREFIX}{target.tensor}"] = target.tensor
            if target.tied_head:
                whole[f"{PREFIX}{TIED_HEAD}.weight"] = target.tensor
    specs = [TensorSpec(k, tuple(t.shape), t.dtype) for k, t in factors.items()]
    specs += [TensorSpec(k, model.info(n).shape, model.info(n).dtype) for k, n in whole.items()]
    writer = ShardWriter(folder, specs, max_shard_bytes=None, metadata={"format": "pt"})
    try:
        for key, tensor in factors.items():
            writer.write(key, tensor)
        for key, name in whole.items():
            writer.write(key, model.get(name))
        writer.finish()
    finally:
        writer.close()
    os.replace(folder / SINGLE_FILE, folder / ADAPTER_WEIGHTS)


def adapter_config(base: str, targets: list[Target], results: list[ModuleResult],
                   base_reader: CheckpointReader) -> dict[str, Any]:
    """PEFT's ``adapter_config.json`` for the extracted modules (scaling 1 everywhere)."""
    lora = {r.module: r.rank for r in results if r.kind in ("lora", "embedding")}
    full = list(dict.fromkeys(r.module for r in results if r.kind == "full"))
    for target, result in zip(targets, results, strict=True):
        if target.tied_head and result.kind == "embedding":
            lora[TIED_HEAD] = result.rank
        elif target.tied_head and result.kind == "full":
            full.append(TIED_HEAD)
    rank = max(lora.values())
    pattern = {module: r for module, r in lora.items() if r != rank}
    parts = [n.split(".")[:-1] for n in base_reader.infos]
    modules = {".".join(p[:i]) for p in parts for i in range(1, len(p) + 1)}  # with every parent
    modules |= {TIED_HEAD} if any(t.tied_head for t in targets) else set()
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": rank, "lora_alpha": rank, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
        "target_modules": short_names(list(lora), modules),
        "modules_to_save": short_names(full, modules, dotted=False) or None,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "inference_mode": True,
    }


def short_names(chosen: list[str], modules: set[str], *, dotted: bool = True) -> list[str]:
    """``chosen`` module names, each leaf name (``q_proj``) standing for its modules where it names
    no module outside ``chosen``, the full name elsewhere.

    PEFT matches ``target_modules`` entries as ``name == entry or name.endswith("." + entry)``
    (``dotted``) but ``modules_to_save`` entries as a plain ``name.endswith(entry)``, where ``norm``
    also names ``input_layernorm``; each rule is checked as PEFT applies it.

    Example:
        >>> short_names(["a.0.q", "a.1.q", "a.0.k"], {"a.0.q", "a.1.q", "a.0.k", "a.1.k"})
        ['a.0.k', 'q']
    """
    picked = set(chosen)
    names: set[str] = set()
    for module in picked:
        leaf = module.rsplit(".", 1)[-1]
        same_leaf = {m for m in modules | picked
                     if m == leaf or m.endswith("." + leaf if dotted else leaf)}
        names.add(leaf if same_leaf <= picked else module)
    return sorted(names)


def adapter_card(base: str, model: str, name: str, results: list[ModuleResult],
                 opts: ExtractOptions) -> str:
    """README.md: Hub metadata (``base_model``, ``library_name: peft``) and how it was extracted."""
    import yaml

    hub_base = hub_repo_id(base)  # the Hub refuses anything but a Hub id as base_model
    metadata: dict[str, object] = {**({"base_model": hub_base} if hub_base else {}), "library_name": "peft",
                                   "tags": ["lora", "fusekit", "extracted"], "fusekit": {"base": base}}
    how = f"--rank {opts.rank}" if opts.rank is not None else (
        f"--energy {opts.energy}" + (f" --max-rank {opts.max_rank}" if opts.max_rank else ""))
    done = [r for r in results if r.kind != "same"]
    total = ExtractResult(Path(name), results).total_relative_error
    lines = ["---", yaml.safe_dump(metadata, sort_keys=False).strip(), "---", "", f"# {name}", "",
             f"A LoRA adapter extracted with fusekit {__version__} from `{model}` over the base "
             f"`{base}`: `fusekit lora extract --base {base} --model {model} OUT_DIR {how} "
             f"--embeddings {opts.embeddings} --norms {opts.norms}`.", "",
             f"Relative Frobenius error ||ΔW - BA|| / ||ΔW|| over all {len(done)} modules: {total:.4f}.",
             "", "| module | kind | rank | relative error |", "|---|---|---|---|",
             *[f"| `{r.module}` | {r.kind} | {r.rank or '-'} | {r.relative_error:.4f} |" for r in done], ""]
    return "\n".join(lines)
