"""``fusekit merge`` of an ``output: adapter`` recipe: resolve the adapters, check they share one
base, combine them (:mod:`fusekit.lora.combine`) and write a PEFT adapter folder under the same
output rules as every merge: the folder is claimed, written to a temporary sibling and renamed
when complete, with a ``fusekit.lock`` (so ``--locked``, the up-to-date check and ``fusekit push``
work as they do on model outputs). The lock pins the adapters' files and the base's config.json,
which is all an adapter merge reads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusekit.errors import CheckpointError
from fusekit.io.card import model_card
from fusekit.io.files import write_error, write_json, write_text
from fusekit.io.lock import (
    LOCK_FILE,
    InputFingerprints,
    check_locked,
    make_lock,
    output_files,
    portable_refs,
    write_lock,
)
from fusekit.io.outputs import claim_output, model_inputs
from fusekit.io.refs import ResolvedAdapter, ResolvedModel, hub_repo_id, resolve_model
from fusekit.io.writer import atomic_output
from fusekit.lora.adapter_recipe import COMBINATIONS, AdapterMergeOptions, adapter_merge_options
from fusekit.lora.config import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from fusekit.plan.executor import ExecutionStats
from fusekit.plan.memory import peak_rss_bytes
from fusekit.recipe.schema import MergeRecipe

log = logging.getLogger("fusekit")
RECIPE_COPY = "fusekit_recipe.yml"


@dataclass(frozen=True)
class AdapterPlan:
    """What an adapter merge reads and how it combines it.

    Attributes:
        recipe / recipe_text: the checked recipe and its text.
        base_ref / base: the base every adapter applies to.
        models: each ``models:`` reference → its resolved adapter (the base's ResolvedModel with
            ``adapter`` set), in recipe order.
        options: the arguments of PEFT's ``add_weighted_adapter``.
    """

    recipe: MergeRecipe
    recipe_text: str
    base_ref: str
    base: ResolvedModel
    models: dict[str, ResolvedModel]
    options: AdapterMergeOptions

    @property
    def adapters(self) -> list[ResolvedAdapter]:
        return [m.adapter for m in self.models.values() if m.adapter is not None]

    def lock_inputs(self) -> dict[str, ResolvedModel]:
        """ref → the files the merge reads, as models for :class:`InputFingerprints`: each adapter's
        weights and config, and the base's config.json alone (its weights are never read)."""
        inputs = {self.base_ref: ResolvedModel(self.base_ref, self.base.folder, (), hub_id=self.base.hub_id,
                                               revision=self.base.revision)}
        for ref, adapter in zip(self.models, self.adapters, strict=True):
            files = (adapter.weights, adapter.folder / ADAPTER_CONFIG)
            inputs[ref] = ResolvedModel(ref, adapter.folder, files, hub_id=adapter.hub_id,
                                        revision=adapter.revision)
        return inputs


@dataclass(frozen=True)
class AdapterMergeResult:
    """What :func:`merge_adapters` returns (the fields the CLI reads match :class:`MergeResult`'s)."""

    out_dir: Path
    plan: AdapterPlan
    stats: ExecutionStats
    seed: int | None  # None: a deterministic combination
    up_to_date: bool = False
    kept_shards: int = 0
    stages: tuple[tuple[str, Any], ...] = ()


def plan_adapter_merge(recipe: MergeRecipe, recipe_text: str, *, allow_pickle: bool = False) -> AdapterPlan:
    """Resolve every model of an ``output: adapter`` recipe and check they are adapters over one base.

    Raises:
        CheckpointError: a model is not an adapter, or its base differs from the others' (the odd
            one is named), or ``base_model`` is itself an adapter.
    """
    base_model = recipe.base_model
    if base_model is not None and resolve_model(base_model, allow_pickle=allow_pickle).adapter is not None:
        raise CheckpointError(f"base_model '{base_model}' is a LoRA adapter; name the full model the "
                              "adapters were trained on")
    models: dict[str, ResolvedModel] = {}
    for i, entry in enumerate(recipe.models or []):
        model = resolve_model(entry.model, base=base_model, allow_pickle=allow_pickle)
        if model.adapter is None:
            raise CheckpointError(f"models[{i}] '{entry.model}' is a full model, not a LoRA adapter; "
                                  "output: adapter merges adapters over one base (remove it, or remove "
                                  "'output: adapter' to write a full model)")
        first = next(iter(models.values()), model)
        if _base_key(model) != _base_key(first):
            raise CheckpointError(f"models[{i}] '{entry.model}' applies to base '{model.base_ref}' "
                                  f"({model.folder}), the first adapter to '{first.base_ref}' "
                                  f"({first.folder}); output: adapter needs every adapter over one base")
        models[entry.model] = model
    first = next(iter(models.values()))
    return AdapterPlan(recipe=recipe, recipe_text=recipe_text, base_ref=base_model or str(first.base_ref),
                       base=first, models=models, options=adapter_merge_options(recipe))


def _base_key(model: ResolvedModel) -> tuple[str, ...]:
    """What identifies a base: its Hub id and commit, or its folder."""
    if model.hub_id is not None:
        return (model.hub_id, str(model.revision))
    return (str(model.folder.resolve()),)


def merge_adapters(recipe: MergeRecipe, recipe_text: str, out_dir: Path, *, recipe_name: str,
                   recipe_dir: Path, recipe_file: Path | None = None, overwrite: bool = False,
                   force: bool = False, random_seed: int | None = None, allow_pickle: bool = False,
                   locked: bool = False, lock_file: str | Path | None = None) -> AdapterMergeResult:
    """Merge the adapters an ``output: adapter`` recipe names into a PEFT adapter folder ``out_dir``.

    Called by :func:`fusekit.merge` (which has checked ``out_dir`` and the seed); the arguments are
    merge()'s. The adapter loads with ``PeftModel.from_pretrained(base, out_dir)``.

    Raises:
        FusekitError: one line: an input is not an adapter or has another base, a rank is too high,
            peft is missing, the output folder is taken or out of date, or ``--locked`` differs.

    Example:
        >>> fusekit.merge("configs/lora/svd-r8.yaml", "./merged-adapter")  # doctest: +SKIP
    """
    from fusekit.lora.combine import check_adapters, require_peft
    from fusekit.merging import pick_seed, up_to_date_lock

    started = time.perf_counter()
    plan = plan_adapter_merge(recipe, recipe_text, allow_pickle=allow_pickle)
    check_adapters(plan.adapters, plan.options)
    require_peft()
    lock_fields = {"recipe_text": recipe_text, "recipe_name": recipe_name, "options": {"output": "adapter"}}
    inputs = model_inputs(plan.lock_inputs().values())
    inputs += [("recipe", recipe_file)] if recipe_file is not None else []
    with claim_output(out_dir, inputs=inputs, overwrite=overwrite, update=True), \
            _fingerprints(plan, recipe_dir, rehash=locked) as fingerprints:
        if locked:
            check_locked(Path(lock_file or out_dir / LOCK_FILE), fingerprints.result())
        stochastic = COMBINATIONS[plan.options.combination].stochastic
        old = None if force else up_to_date_lock(out_dir, random_seed, fingerprints, lock_fields,
                                                 stochastic=stochastic, overwrite=overwrite, rehash=locked)
        if old is not None:
            return _result(plan, out_dir, old.get("random_seed"), started, up_to_date=True)
        seed = pick_seed(random_seed, stochastic=stochastic)
        recorded = seed if stochastic else None
        _write(plan, out_dir, seed, fingerprints, lock_fields, recorded=recorded)
    return _result(plan, out_dir, recorded, started)


@contextmanager
def _fingerprints(plan: AdapterPlan, recipe_dir: Path, *, rehash: bool) -> Iterator[InputFingerprints]:
    inputs = plan.lock_inputs()
    fingerprints = InputFingerprints(inputs, rehash=rehash, names=portable_refs(inputs, recipe_dir))
    try:
        yield fingerprints
    finally:
        fingerprints.cancel()


def _write(plan: AdapterPlan, out_dir: Path, seed: int, fingerprints: InputFingerprints,
           lock_fields: dict[str, Any], *, recorded: int | None) -> None:
    """Combine the adapters and write the folder: weights, config, card, recipe copy and lock;
    ``recorded`` is the seed the card and lock name (None for a deterministic combination)."""
    from safetensors.torch import save_file

    from fusekit.lora.combine import combine_adapters

    names = fingerprints.names
    combined = combine_adapters(plan.base, plan.adapters, plan.options, seed=seed,
                                base_name=_base_name(plan, names))
    with atomic_output(out_dir, overwrite=True) as temp:
        try:
            save_file(combined.tensors, str(temp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        except OSError as exc:
            raise write_error(temp / ADAPTER_WEIGHTS, exc) from None
        write_json(temp / ADAPTER_CONFIG, combined.config)
        write_text(temp / "README.md", _card(plan, out_dir.name, recorded, names))
        write_text(temp / RECIPE_COPY, plan.recipe_text)
        write_lock(temp, make_lock(seed=recorded, inputs=fingerprints.result(), outputs=output_files(temp),
                                   **lock_fields))


def _base_name(plan: AdapterPlan, names: dict[str, str]) -> str:
    """``base_model_name_or_path`` for the new adapter: what every input adapter says when they agree,
    else the base as the recipe (or lock) names it."""
    said = {a.config.base_model for a in plan.adapters}
    if len(said) == 1 and None not in said:
        return str(next(iter(said)))
    return plan.base.hub_id or names.get(plan.base_ref, plan.base_ref)


def _card(plan: AdapterPlan, name: str, seed: int | None, names: dict[str, str]) -> str:
    hub_ids = [h for h in (hub_repo_id(ref) for ref in plan.models) if h]
    metadata: dict[str, object] = {"library_name": "peft", "tags": ["merge", "fusekit", "lora", "peft"],
                                   "merge_method": plan.options.combination}
    if plan.base.hub_id:  # the Hub refuses anything but a Hub id as base_model
        metadata["base_model"] = plan.base.hub_id
    if hub_ids:
        metadata["adapters"] = hub_ids
    return model_card(name=name, method=plan.options.combination, models=[plan.base_ref, *plan.models],
                      base=plan.base_ref, recipe_text=plan.recipe_text, seed=seed, names=names,
                      extra_metadata=metadata)


def _result(plan: AdapterPlan, out_dir: Path, seed: int | None, started: float, *,
            up_to_date: bool = False) -> AdapterMergeResult:
    weights = out_dir / ADAPTER_WEIGHTS
    written = 0 if up_to_date or not weights.is_file() else weights.stat().st_size
    tensors = 0 if up_to_date else _tensor_count(weights)
    read = sum(a.weights.stat().st_size for a in plan.adapters)
    stats = ExecutionStats(tensors=tensors, bytes_read=0 if up_to_date else read, bytes_written=written,
                           seconds=time.perf_counter() - started, peak_rss_bytes=peak_rss_bytes(),
                           files=(weights,))
    return AdapterMergeResult(out_dir=out_dir, plan=plan, stats=stats, seed=seed, up_to_date=up_to_date)


def _tensor_count(weights: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        return len(list(handle.keys()))
