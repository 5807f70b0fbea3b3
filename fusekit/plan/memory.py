"""The memory model of a merge: work units, the budget they share, and the peak they reach.

The executor cuts every task into units: a whole tensor, or a block of rows of a large tensor whose
method is elementwise or blockwise (a blockwise method reads its blocks once per statistics pass,
then once more to write them). Every unit holds its inputs and its output from reading to writing
(*held* bytes); only the unit in the kernel has the kernel's temporaries (*transient* bytes). The
budget for tensors is ``--max-memory`` minus the process's own footprint; units are cut so that
about :data:`UNITS_IN_FLIGHT` fit in it at once. ``fusekit plan``'s estimate
(:func:`memory_estimate`) and the executor use the same functions, so the estimate is the bound the
run keeps. Nothing here reads tensor data or starts a thread.
"""

from __future__ import annotations

import logging
import math
import resource
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from fusekit.ops import get_method
from fusekit.ops.registry import TensorContext
from fusekit.plan.graph import Plan, TaskGraph, TensorTask

log = logging.getLogger("fusekit")

# Units are cut so that about this many fit in the budget at once: one being read, one in the
# kernel, one being written, and one spare.
UNITS_IN_FLIGHT = 4
# Below this a budget only slows a merge down (tiny row blocks) without saving memory that matters.
MIN_WORKING_BYTES = 64 * 2**20


@dataclass(frozen=True)
class WorkUnit:
    """A whole task, or rows ``[rows[0], rows[1])`` of it.

    Blocks of a blockwise method (see :class:`fusekit.ops.registry.BlockwiseMerge`) also carry a
    ``stage``: statistics passes ``0 .. passes − 1`` read their rows and write nothing, the last
    stage (``== passes``) writes the output rows.

    Attributes:
        task: the output tensor this unit computes (part of).
        rows: the block of rows, or None for the whole tensor.
        stage: which pass over the tensor this unit belongs to.
        passes: how many statistics passes the tensor's method makes (0: none).
        delta_bytes: what reading the task's inputs through LoRA adapters holds besides the read
            buffers: the whole tensor's ΔW in float32 (kept across its row blocks), one read at a time.
    """

    task: TensorTask
    rows: tuple[int, int] | None = None
    stage: int = 0
    passes: int = 0
    delta_bytes: int = 0  # float32 ΔW (and DoRA's whole base) a LoRA adapter's read holds

    @property
    def writes(self) -> bool:
        """Whether this unit writes output rows (False for a statistics pass)."""
        return self.stage == self.passes

    @property
    def last_block(self) -> bool:
        """Whether this unit ends its tensor's pass (the whole tensor, or its last rows)."""
        return self.rows is None or self.rows[1] == self.task.shape[0]

    @property
    def first_row(self) -> int:
        """The output row this unit's block starts at."""
        return self.rows[0] if self.rows else 0

    @cached_property
    def _memory(self) -> tuple[int, int]:
        held, transient = self.task.memory(self._row_count())
        return (held if self.writes else held - self.out_bytes), transient

    @property
    def working_bytes(self) -> int:
        """Held plus transient bytes: the unit's peak while its kernel runs."""
        return sum(self._memory)

    @property
    def held_bytes(self) -> int:
        """Bytes reserved from reading to writing: inputs as stored, and the output block."""
        return self._memory[0]

    @property
    def transient_bytes(self) -> int:
        """Bytes that exist only while the kernel runs (dtype conversions, temporaries)."""
        return self._memory[1]

    @property
    def stored_bytes(self) -> int:
        """Bytes of the unit's inputs as stored (what its read buffers hold)."""
        return self.task.stored_bytes(self._row_count())

    @property
    def out_bytes(self) -> int:
        """Bytes of the unit's output block in the output dtype."""
        return self.task.block_numel(self._row_count()) * self.task.out_dtype.itemsize

    @property
    def written_bytes(self) -> int:
        """Bytes this unit writes: :attr:`out_bytes`, or 0 for a statistics pass."""
        return self.out_bytes if self.writes else 0

    def _row_count(self) -> int | None:
        return None if self.rows is None else self.rows[1] - self.rows[0]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    Returns:
        Bytes (Linux reports KiB, converted here).
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now.

    Returns:
        Bytes, from ``/proc/self/statm``; the peak so far where that cannot be read.
    """
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def working_budget(max_memory: int | None) -> int | None:
    """Bytes available for tensors in flight: ``max_memory`` less this process's footprint.

    Args:
        max_memory: the bound on resident memory (``--max-memory``), or None for no bound.

    Returns:
        The budget, at least :data:`MIN_WORKING_BYTES` (with a warning when the bound leaves less);
        None when ``max_memory`` is None.
    """
    if max_memory is None:
        return None
    baseline = current_rss_bytes()
    if max_memory - baseline < MIN_WORKING_BYTES:
        log.warning("--max-memory %d MB leaves less than %d MB beyond what fusekit itself uses "
                    "(%d MB); using %d MB for tensors", max_memory // 10**6,
                    MIN_WORKING_BYTES // 2**20, baseline // 10**6, MIN_WORKING_BYTES // 2**20)
        return MIN_WORKING_BYTES
    return max_memory - baseline


def split_units(plan: TaskGraph | Plan, budget: int | None) -> list[WorkUnit]:
    """Cut the plan's tasks into the units the executor runs, in run order.

    A task whose working set exceeds ``budget / UNITS_IN_FLIGHT`` is cut into row blocks when its
    method allows (elementwise; or blockwise, then once per pass); others stay whole.

    Args:
        plan: the tasks to run.
        budget: bytes for tensors in flight (:func:`working_budget`), or None: every task whole.

    Returns:
        The units, tasks in plan order; a blockwise tensor's units in stage, then row, order.
    """
    units: list[WorkUnit] = []
    deltas = _adapter_deltas(plan)
    for task in plan.tasks:
        delta = deltas(task)
        target = budget // UNITS_IN_FLIGHT if budget else None
        rows = task.shape[0] if len(task.shape) > 1 else 0
        passes = stats_passes(task)
        if (target is None or task.working_bytes() <= target or rows < 2 or passes is None
                or not task.compute_dtype.is_floating_point):
            units.append(WorkUnit(task, delta_bytes=delta))
            continue
        per_row = max(1, task.working_bytes(1))
        step = max(1, min(rows, target // per_row))
        blocks = [(r, min(rows, r + step)) for r in range(0, rows, step)]
        units += [WorkUnit(task, block, stage, passes, delta)
                  for stage in range(passes + 1) for block in blocks]
    return units


def _adapter_deltas(plan: TaskGraph | Plan) -> Callable[[TensorTask], int]:
    """task → :attr:`WorkUnit.delta_bytes`, from the adapters' and bases' headers."""
    adapted = {ref: model for ref, model in plan.models.items() if model.adapter is not None}
    if not adapted:
        return lambda task: 0
    from fusekit.io.reader import CheckpointReader
    from fusekit.lora.layout import delta_bytes

    infos = {}
    for ref, model in adapted.items():
        with CheckpointReader(model) as reader:
            infos[ref] = reader.infos
    return lambda task: sum(delta_bytes(adapted[i.model], infos[i.model], i.name)
                            for i in task.all_inputs if i.model in adapted)


def stats_passes(task: TensorTask) -> int | None:
    """How many statistics passes a blockwise method makes over ``task``.

    Returns:
        0 for elementwise methods; None when ``task`` cannot be cut into row blocks.
    """
    method = get_method(task.method)
    if method.blockwise is None:
        return 0 if method.elementwise else None
    context = TensorContext(task.model_params, task.params, task.shape, task.compute_dtype)
    return method.blockwise(context).passes


def held_budget(units: list[WorkUnit], budget: int | None) -> int | None:
    """The part of ``budget`` for held bytes.

    What is left after reserving the largest kernel's temporaries, which exist for one unit at a
    time (kernels run on one thread), and the idle read buffers the pool may keep.

    Returns:
        Bytes (at least 1), or None when ``budget`` is None.
    """
    if budget is None:
        return None
    reserved = max((u.transient_bytes for u in units), default=0) + idle_limit(units, budget)
    return max(1, budget - reserved - max((u.delta_bytes for u in units), default=0))


def idle_limit(units: list[WorkUnit], budget: int | None) -> int:
    """How many bytes of idle read buffers the pool may keep.

    Enough for one unit's inputs, which is what the next unit of the same shapes reuses, and no
    more than a unit's share of ``budget``.
    """
    largest = max((u.stored_bytes for u in units), default=0)
    return largest if budget is None else min(largest, budget // UNITS_IN_FLIGHT)


def peak_working_bytes(units: list[WorkUnit], budget: int | None) -> int:
    """The most working memory a run can hold at once.

    The largest sum of held bytes over consecutive units that the held budget admits together (a
    unit larger than it runs alone), plus the largest kernel's temporaries and the idle buffers.

    Args:
        units: the run's units (:func:`split_units`).
        budget: the same budget the units were cut for.

    Returns:
        Bytes.
    """
    transient = max((u.transient_bytes for u in units), default=0)
    transient += max((u.delta_bytes for u in units), default=0)
    limit = held_budget(units, budget)
    if limit is None:
        return max((u.working_bytes for u in units), default=0) + idle_limit(units, budget)
    peak = window = start = 0
    for index, unit in enumerate(units):
        window += unit.held_bytes
        while window > limit and start < index:
            window -= units[start].held_bytes
            start += 1
        peak = max(peak, window)
    return peak + transient + idle_limit(units, budget)


def memory_estimate(plan: TaskGraph | Plan, max_memory: int | None) -> tuple[int, int, int]:
    """Peak memory of a run of ``plan`` under ``max_memory``, from headers alone.

    Args:
        plan: the tasks a run would execute.
        max_memory: the bound the run would get (``--max-memory``), or None.

    Returns:
        (peak resident bytes, this process's current footprint, peak working bytes); the footprint
        stands in for the merge process's own.

    Example:
        >>> peak, baseline, working = memory_estimate(fusekit.plan_merge("r.yaml"), 10**9)  # doctest: +SKIP
    """
    baseline = current_rss_bytes()
    budget = vocab_reserved(plan, working_budget(max_memory))
    working = peak_working_bytes(split_units(plan, budget), budget) + vocab_buffer_bytes(plan)
    return baseline + working, baseline, working


def vocab_buffer_bytes(plan: TaskGraph | Plan) -> int:
    """Bytes a plan's vocabulary alignment keeps while the run lasts (filled and padding rows of
    its embeddings and LM heads; see :meth:`fusekit.vocab.VocabAlignment.buffer_bytes`); 0 without one.
    """
    if not isinstance(plan, Plan) or plan.vocab is None:
        return 0
    row = max((math.prod(t.shape[1:]) for t in plan.tasks if t.output in plan.vocab.groups), default=0)
    return plan.vocab.buffer_bytes(row)


def vocab_reserved(plan: TaskGraph | Plan, budget: int | None) -> int | None:
    """``budget`` less :func:`vocab_buffer_bytes` (at least :data:`MIN_WORKING_BYTES`)."""
    if budget is None:
        return None
    return max(MIN_WORKING_BYTES, budget - vocab_buffer_bytes(plan))
