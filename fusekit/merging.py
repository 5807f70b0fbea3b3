"""``fusekit.merge`` and ``fusekit.plan``: the library entry points behind the CLI commands."""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, replace
from pathlib import Path

from fusekit.io.card import model_card
from fusekit.io.tokenizer import copy_generation_config, copy_tokenizer, write_chat_template
from fusekit.io.writer import atomic_output, check_output_folder, write_json, write_text
from fusekit.ops import get_method
from fusekit.plan import ExecutionStats, Executor, Plan, build_plan, resolve_device
from fusekit.recipe import MergeRecipe, load_merge_recipe
from fusekit.recipe.load import read_recipe_text

DEFAULT_SHARD_BYTES = 5 * 10**9
DEFAULT_MAX_MEMORY = 10**9
log = logging.getLogger("fusekit")
RECIPE_COPY = "mergekit_config.yml"  # the name Hub tooling looks for, so merges are recognised


@dataclass(frozen=True)
class MergeResult:
    """The written output folder and what the run measured."""

    out_dir: Path
    plan: Plan
    stats: ExecutionStats
    seed: int


def plan(recipe: str | Path, *, allow_pickle: bool = False) -> Plan:
    """Validate ``recipe`` and plan every output tensor, reading headers and configs only."""
    path = Path(recipe)
    parsed, _ = load_merge_recipe(path)
    return build_plan(parsed, recipe_text=read_recipe_text(path), allow_pickle=allow_pickle)


def merge(recipe: str | Path, out_dir: str | Path, *, overwrite: bool = False,
          out_shard_size: int | None = DEFAULT_SHARD_BYTES, device: str = "cpu",
          allow_pickle: bool = False, copy_tokenizer_files: bool = True,
          random_seed: int | None = None, max_memory: int | None = DEFAULT_MAX_MEMORY,
          pipelined: bool = True, progress: bool = False) -> MergeResult:
    """Merge the models a recipe names and write a transformers-loadable model to ``out_dir``.

    Args:
        recipe: path of a YAML merge recipe (mergekit's format).
        out_dir: output folder; it appears only once the merge is complete.
        overwrite: replace an existing non-empty ``out_dir``.
        out_shard_size: largest shard in bytes (None: one file).
        device: ``cpu``, ``cuda``, ``cuda:N`` or ``auto``.
        allow_pickle: accept ``.bin``/``.pt`` inputs (loaded with ``weights_only=True``).
        copy_tokenizer_files: copy the tokenizer of ``tokenizer_source`` (default: the base).
        random_seed: seed for stochastic methods (DARE, DELLA, ...); None picks one, which is
            logged and written to the model card so the run can be repeated.
        max_memory: bound on the process's resident memory in bytes (None: one tensor at a
            time, unbounded); tensors of elementwise methods are split into row blocks to fit.
        pipelined: overlap reading, arithmetic and writing on separate threads (the sequential
            mode gives the same bytes).
        progress: show a progress bar on stderr.

    Example:
        >>> fusekit.merge("configs/linear.yaml", "./merged")  # doctest: +SKIP
    """
    out_dir = Path(out_dir)
    check_output_folder(out_dir, overwrite=overwrite)
    merge_plan = plan(recipe, allow_pickle=allow_pickle)
    seed = pick_seed(random_seed, stochastic=get_method(merge_plan.recipe.merge_method).stochastic)
    executor = Executor(merge_plan, device=resolve_device(device), max_shard_bytes=out_shard_size,
                        seed=seed, max_memory=max_memory, pipelined=pipelined, progress=progress)
    with atomic_output(out_dir, overwrite=overwrite) as temp:
        stats = executor.run(temp)
        write_side_files(merge_plan, temp, name=out_dir.name, tokenizer=copy_tokenizer_files,
                         seed=seed)
    stats = replace(stats, files=tuple(out_dir / f.name for f in stats.files))
    return MergeResult(out_dir=out_dir, plan=merge_plan, stats=stats, seed=seed)


def pick_seed(seed: int | None, *, stochastic: bool) -> int:
    """``seed`` itself, or a fresh one (logged when the method draws random numbers)."""
    if seed is not None:
        return seed
    chosen = secrets.randbelow(2**31)
    if stochastic:
        log.warning("random seed %d (pass --random-seed %d to repeat this merge)", chosen, chosen)
    return chosen


def write_side_files(merge_plan: Plan, out: Path, *, name: str, tokenizer: bool = True,
                     seed: int = 0) -> None:
    """config.json, generation config, tokenizer, model card and the recipe, beside the weights."""
    write_json(out / "config.json", merge_plan.out_config)
    donor = merge_plan.models[merge_plan.donor]
    copy_generation_config(donor, out)
    if tokenizer and merge_plan.tokenizer_source is not None:
        copy_tokenizer(merge_plan.tokenizer_source, out)
        if merge_plan.chat_template is not None:
            write_chat_template(out, merge_plan.chat_template)
    recipe: MergeRecipe = merge_plan.recipe
    write_text(out / "README.md", model_card(
        name=name, method=recipe.merge_method, models=list(merge_plan.models),
        base=recipe.base_model, recipe_text=merge_plan.recipe_text, seed=seed))
    write_text(out / RECIPE_COPY, merge_plan.recipe_text)
