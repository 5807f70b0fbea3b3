"""The executor: pipelined, sequential and row-blocked runs give the same bytes; the budget holds."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch
from conftest import load_weights, write_recipe

import fusekit
from fusekit.errors import FusekitError
from fusekit.io.reader import CheckpointReader
from fusekit.io.writer import ShardWriter
from fusekit.ops import registry
from fusekit.plan import memory as memory_module
from fusekit.plan import process as process_module
from fusekit.plan.executor import Executor
from fusekit.plan.memory import WorkUnit, peak_working_bytes, split_units
from fusekit.plan.pipeline import ByteBudget
from fusekit.plan.process import usable_cores

RECIPES = {
    "linear": """merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.5}}}}
  - {{model: {math}, parameters: {{weight: [0.2, 0.7]}}}}
  - {{model: {code}, parameters: {{weight: 0.3}}}}
""",
    "task_arithmetic": """merge_method: task_arithmetic
base_model: {base}
models:
  - {{model: {math}, parameters: {{weight: 0.6}}}}
  - {{model: {code}, parameters: {{weight: [{{filter: mlp, value: 0.2}}, {{value: 0.9}}]}}}}
parameters: {{lambda: 1.3, normalize: true}}
""",
    "nearswap": """merge_method: nearswap
base_model: {base}
models: [{{model: {math}}}]
parameters: {{t: 0.01}}
""",
    "passthrough": """merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 2], parameters: {{scale: 0.5}}}}]
  - sources: [{{model: {math}, layer_range: [1, 2]}}]
""",
}
_TV = """merge_method: {method}
base_model: {{base}}
models:
  - {{{{model: {{math}}, parameters: {{{{weight: 0.6, density: [0.3, 0.8]{extra}}}}}}}}}
  - {{{{model: {{code}}, parameters: {{{{weight: 0.5, density: 0.5{extra}}}}}}}}}
parameters: {params}
"""
# Methods that need whole-tensor statistics (magnitude cut-offs, L1 norms) run blockwise.
BLOCKWISE = {
    "ties": _TV.format(method="ties", extra="", params="{{}}"),
    "ties_rescaled": _TV.format(method="ties", extra="", params="{{rescale: true, lambda: 1.2}}"),
    "breadcrumbs_ties": _TV.format(method="breadcrumbs_ties", extra=", gamma: 0.05",
                                   params="{{rescale: true}}"),
    "dare_ties": _TV.format(method="dare_ties", extra="", params="{{}}"),
    "della_linear": _TV.format(method="della_linear", extra=", epsilon: 0.1", params="{{}}"),
    "slerp": """merge_method: slerp
base_model: {base}
models: [{{model: {base}}}, {{model: {math}}}]
parameters: {{t: [0.2, 0.9]}}
""",
    "nuslerp": """merge_method: nuslerp
base_model: {base}
models: [{{model: {math}, parameters: {{weight: 0.3}}}}, {{model: {code}, parameters: {{weight: 0.6}}}}]
""",
    "nuslerp_rows": """merge_method: nuslerp
models: [{{model: {math}, parameters: {{weight: 0.3}}}}, {{model: {code}, parameters: {{weight: 0.6}}}}]
parameters: {{nuslerp_flatten: false}}
""",
    "model_stock": """merge_method: model_stock
base_model: {base}
models: [{{model: {math}}}, {{model: {code}}}, {{model: {base}}}]
""",
}
RECIPES.update(BLOCKWISE)


def _recipe(tmp_path: Path, models: dict[str, Path], method: str) -> Path:
    return write_recipe(tmp_path / f"{method}.yaml",
                        RECIPES[method].format(**{k: str(v) for k, v in models.items()}))


def _tiny_budget(monkeypatch: pytest.MonkeyPatch) -> int:
    """Make the budget a few KiB so that every tensor of an elementwise method is cut into rows."""
    monkeypatch.setattr(memory_module, "current_rss_bytes", lambda: 0)
    monkeypatch.setattr(memory_module, "MIN_WORKING_BYTES", 0)
    return 16 * 1024


@pytest.mark.parametrize("method", sorted(RECIPES))
def test_pipelined_sequential_and_row_blocked_runs_are_byte_identical(
        method: str, tiny_models: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe(tmp_path, tiny_models, method)
    fusekit.merge(recipe, tmp_path / "seq", pipelined=False, max_memory=None, random_seed=1)
    fusekit.merge(recipe, tmp_path / "pipe", pipelined=True, random_seed=1)
    small = _tiny_budget(monkeypatch)
    blocked = fusekit.merge(recipe, tmp_path / "blocks", max_memory=small, random_seed=1)
    assert len(blocked.plan.tasks) < len(split_units(blocked.plan, small))
    reference = (tmp_path / "seq" / "model.safetensors").read_bytes()
    assert (tmp_path / "pipe" / "model.safetensors").read_bytes() == reference
    assert (tmp_path / "blocks" / "model.safetensors").read_bytes() == reference


@pytest.mark.parametrize("method", sorted(BLOCKWISE))
def test_blockwise_methods_give_the_same_bytes_for_any_block_size(
        method: str, bf16_models: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 inputs (16-bit magnitude keys: one counting pass) with several budgets: the
    statistics passes and the tie quotas carried from block to block give whole-tensor bytes."""
    recipe = _recipe(tmp_path, bf16_models, method)
    fusekit.merge(recipe, tmp_path / "whole", max_memory=None, random_seed=3)
    reference = (tmp_path / "whole" / "model.safetensors").read_bytes()
    _tiny_budget(monkeypatch)
    for budget in (6 * 1024, 40 * 1024):
        blocked = fusekit.merge(recipe, tmp_path / f"b{budget}", max_memory=budget, random_seed=3,
                                pipelined=budget > 10_000)
        units = split_units(blocked.plan, budget)
        assert any(u.stage > 0 for u in units) or method == "nuslerp_rows"
        assert len(units) > len(blocked.plan.tasks)
        assert (tmp_path / f"b{budget}" / "model.safetensors").read_bytes() == reference


def test_row_blocks_cover_each_tensor_exactly_once(tiny_models: dict[str, Path],
                                                   tmp_path: Path) -> None:
    plan = fusekit.plan_merge(_recipe(tmp_path, tiny_models, "linear"))
    units = split_units(plan, 8 * 1024)
    for task in plan.tasks:
        blocks = sorted(u.rows or (0, task.shape[0]) for u in units if u.task is task)
        assert blocks[0][0] == 0 and blocks[-1][1] == task.shape[0]
        assert all(a[1] == b[0] for a, b in zip(blocks, blocks[1:], strict=False))
        assert all(u.working_bytes <= 8 * 1024 // 4 or u.rows is None or
                   u.rows[1] - u.rows[0] == 1 for u in units if u.task is task)


def test_no_budget_keeps_tasks_whole(tiny_models: dict[str, Path], tmp_path: Path) -> None:
    plan = fusekit.plan_merge(_recipe(tmp_path, tiny_models, "linear"))
    assert [u.task for u in split_units(plan, None)] == list(plan.tasks)


def test_peak_working_bytes_is_the_largest_admitted_window(tiny_models: dict[str, Path],
                                                           tmp_path: Path) -> None:
    plan = fusekit.plan_merge(_recipe(tmp_path, tiny_models, "linear"))
    units = [WorkUnit(task) for task in plan.tasks]
    held = [u.held_bytes for u in units]
    transient = max(u.transient_bytes for u in units)
    idle = max(u.stored_bytes for u in units)  # the pool keeps one unit's inputs
    assert all(u.held_bytes + u.transient_bytes == u.working_bytes for u in units)
    assert peak_working_bytes(units, None) == max(u.working_bytes for u in units) + idle
    assert peak_working_bytes(units, 10**12) == sum(held) + transient + idle
    budget = max(4 * idle, max(held) + min(held) + transient + idle)  # pool cap: one unit's inputs
    limit = budget - transient - idle
    expected = max(sum(held[i:j]) for i in range(len(held)) for j in range(i + 1, len(held) + 1)
                   if sum(held[i:j]) <= limit or j == i + 1)
    assert peak_working_bytes(units, budget) == expected + transient + idle


def test_budget_blocks_until_release_and_lets_an_oversized_request_run_alone() -> None:
    budget = ByteBudget(100)
    budget.acquire(60)
    got = threading.Event()

    def take() -> None:
        budget.acquire(50)
        got.set()

    thread = threading.Thread(target=take)
    thread.start()
    time.sleep(0.05)
    assert not got.is_set()
    budget.release(60)
    thread.join(timeout=5)
    assert got.is_set()
    budget.release(50)
    budget.acquire(500)  # larger than the budget, but nothing else is reserved
    assert budget.reserved == 500


def test_kernel_error_in_pipelined_run_leaves_nothing(tiny_models: dict[str, Path],
                                                      tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path / "zero.yaml", f"""merge_method: linear
models:
  - {{model: {tiny_models['base']}, parameters: {{weight: 1.0}}}}
  - {{model: {tiny_models['math']}, parameters: {{weight: -1.0}}}}
""")
    with pytest.raises(FusekitError, match="sum to 0"):
        fusekit.merge(recipe, tmp_path / "out")
    assert list(tmp_path.iterdir()) == [recipe]


def test_merge_reads_inputs_exactly(tiny_models: dict[str, Path], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _recipe(tmp_path, tiny_models, "passthrough")
    fusekit.merge(recipe, tmp_path / "out", max_memory=_tiny_budget(monkeypatch))
    out, base = load_weights(tmp_path / "out"), load_weights(tiny_models["base"])
    assert (out["model.embed_tokens.weight"] == base["model.embed_tokens.weight"] * 0.5).all()


# -- the process as the caller left it, and errors as they were raised -------------------------


@pytest.fixture
def odd_threads() -> Iterator[int]:
    """torch set to a thread count no merge chooses (one more than the usable cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(usable_cores() + 1)
    yield usable_cores() + 1
    torch.set_num_threads(before)


class _StepFailed(FusekitError):
    """An error ``type(exc)(message)`` cannot rebuild (two arguments), with an attribute."""

    def __init__(self, message: str, step: str) -> None:
        super().__init__(message)
        self.step = step


def _fail_chained(step: str, raised: list[BaseException]) -> NoReturn:
    """Raise a :class:`_StepFailed` whose ``__cause__`` is an OSError and ``__context__`` a KeyError."""
    try:
        raise KeyError("context")
    except KeyError:
        error = _StepFailed(f"{step} failed", step)
        raised.append(error)
        raise error from OSError("cause")


def test_merge_restores_torch_threads_and_tunes_malloc_only_when_allowed(
        odd_threads: int, tiny_models: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []
    compute = Executor.compute
    monkeypatch.setattr(Executor, "compute", lambda self, unit, stored: (
        seen.append(torch.get_num_threads()), compute(self, unit, stored))[1])
    tuned: list[int] = []
    monkeypatch.setattr(process_module, "map_large_allocations", lambda *a: tuned.append(1) or True)
    monkeypatch.setattr(process_module, "_malloc_tuning", False)
    monkeypatch.delenv("FUSEKIT_MMAP_THRESHOLD", raising=False)
    recipe = _recipe(tmp_path, tiny_models, "linear")  # linear streams: every tensor splits into rows
    fusekit.merge(recipe, tmp_path / "library")
    assert seen and set(seen) == {usable_cores()}  # the kernels ran on every core...
    assert torch.get_num_threads() == odd_threads  # ...and the caller's count is back
    assert tuned == []  # a library call never fixes glibc's mmap threshold (it cannot be undone)
    process_module.allow_malloc_tuning()  # what the fusekit command does
    fusekit.merge(recipe, tmp_path / "command", pipelined=False)
    assert tuned == [1] and torch.get_num_threads() == odd_threads
    monkeypatch.setenv("FUSEKIT_MMAP_THRESHOLD", "0")
    fusekit.merge(recipe, tmp_path / "off")
    assert tuned == [1]


@pytest.mark.parametrize("step", ["read", "write"])
def test_pipeline_thread_errors_reach_the_caller_as_raised(
        step: str, odd_threads: int, tiny_models: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """An error on the reader or writer thread is the caller's exception: the same object, with
    its type, attributes, message, cause and context; the process settings are restored."""
    raised: list[BaseException] = []

    def fail(*args: object, **kwargs: object) -> NoReturn:
        _fail_chained(step, raised)

    monkeypatch.setattr(CheckpointReader if step == "read" else ShardWriter,
                        "get" if step == "read" else "write", fail)
    with pytest.raises(_StepFailed) as caught:
        fusekit.merge(_recipe(tmp_path, tiny_models, "linear"), tmp_path / "out")
    error = caught.value
    assert error is raised[0] and error.step == step and str(error) == f"{step} failed"
    assert isinstance(error.__cause__, OSError) and isinstance(error.__context__, KeyError)
    assert torch.get_num_threads() == odd_threads
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("pipelined", [True, False])
def test_kernel_error_keeps_its_type_attributes_and_chain(
        pipelined: bool, odd_threads: int, tiny_models: dict[str, Path], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A kernel's error gains the tensor's name in its message and loses nothing else."""
    raised: list[BaseException] = []

    def kernel(inputs: registry.MergeInputs) -> NoReturn:
        _fail_chained("kernel", raised)

    linear = registry.get_method("linear")
    monkeypatch.setitem(registry._METHODS, "linear", dataclasses.replace(linear, kernel=kernel))
    with pytest.raises(_StepFailed) as caught:
        fusekit.merge(_recipe(tmp_path, tiny_models, "linear"), tmp_path / "out", pipelined=pipelined)
    error = caught.value
    first = next(iter(fusekit.plan_merge(_recipe(tmp_path, tiny_models, "linear")).tasks)).output
    assert error is raised[0] and error.step == "kernel"
    assert str(error) == f"tensor '{first}': kernel failed"
    assert isinstance(error.__cause__, OSError) and isinstance(error.__context__, KeyError)
    assert torch.get_num_threads() == odd_threads
