"""Run a plan: read inputs, apply the merge kernel, stream results into the shards.

The work is cut into units: a whole tensor, or a block of rows of a large tensor whose method is
elementwise or blockwise. A blockwise method (TIES, DARE, breadcrumbs, DELLA) first reads its
blocks in one or more statistics passes (magnitude counts, L1 norms) and then once more to write
them. In the pipelined mode a reader thread prefetches the next units' inputs, the calling
thread runs the kernels, and a writer thread writes results at their file offsets, so reading,
arithmetic and writing overlap. Every unit reserves its held bytes (inputs and output) from a
budget before it is read and frees them once written; the budget is ``--max-memory`` minus the
process's own footprint and minus the largest kernel's temporaries, which only the one unit in the
kernel has. Resident memory is so bounded whatever the model size. The sequential mode runs the same units in
order on one thread; both give identical bytes.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import queue
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import torch

from fusekit.errors import FusekitError, TensorMismatchError
from fusekit.io.buffers import BufferPool
from fusekit.io.journal import OutputGuard
from fusekit.io.layout import TensorSpec
from fusekit.io.reader import CheckpointReader
from fusekit.io.writer import ShardWriter
from fusekit.ops import MergeInputs, get_method
from fusekit.ops.registry import BlockwiseMerge, TensorContext
from fusekit.plan.graph import Plan, TensorTask
from fusekit.version import __version__

log = logging.getLogger("fusekit")

# Units are cut so that about this many fit in the budget at once: one being read, one in the
# kernel, one being written, and one spare.
UNITS_IN_FLIGHT = 4
_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
# Below this a budget only slows a merge down (tiny row blocks) without saving memory that matters.
MIN_WORKING_BYTES = 64 * 2**20


@dataclass(frozen=True)
class ExecutionStats:
    """What a run did: counts, sizes, time and the process's peak resident memory."""

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    files: tuple[Path, ...]


@dataclass(frozen=True)
class WorkUnit:
    """A whole task, or rows ``[rows[0], rows[1])`` of it.

    Blocks of a blockwise method (see :class:`fusekit.ops.registry.BlockwiseMerge`) also carry a
    ``stage``: statistics passes ``0 .. passes − 1`` read their rows and write nothing, the last
    stage (``== passes``) writes the output rows.
    """

    task: TensorTask
    rows: tuple[int, int] | None = None
    stage: int = 0
    passes: int = 0

    @property
    def writes(self) -> bool:
        return self.stage == self.passes

    @property
    def last_block(self) -> bool:
        return self.rows is None or self.rows[1] == self.task.shape[0]

    @property
    def first_row(self) -> int:
        return self.rows[0] if self.rows else 0

    @cached_property
    def _memory(self) -> tuple[int, int]:
        held, transient = self.task.memory(self._row_count())
        return (held if self.writes else held - self.out_bytes), transient

    @property
    def working_bytes(self) -> int:
        return sum(self._memory)

    @property
    def held_bytes(self) -> int:
        return self._memory[0]

    @property
    def transient_bytes(self) -> int:
        return self._memory[1]

    @property
    def stored_bytes(self) -> int:
        return self.task.stored_bytes(self._row_count())

    @property
    def out_bytes(self) -> int:
        return self.task.block_numel(self._row_count()) * self.task.out_dtype.itemsize

    @property
    def written_bytes(self) -> int:
        return self.out_bytes if self.writes else 0

    def _row_count(self) -> int | None:
        return None if self.rows is None else self.rows[1] - self.rows[0]


def map_large_allocations(threshold: int = 4 * 2**20) -> bool:
    """Have glibc serve allocations above ``threshold`` with their own memory maps.

    Tensors are allocated on one thread and freed on another; glibc's default, a threshold that
    rises with the sizes freed, then keeps tens of megabytes per tensor size in its heaps. A fixed
    threshold returns every large tensor to the system when freed: on a 2B-parameter linear merge
    peak resident memory fell by about a third, at no cost in speed, and on a 1B TIES merge in row
    blocks from 1.25 GB to 0.92 GB; whole-tensor kernels with many large temporaries pay for the
    page faults, so it is used only when every tensor can be cut into row blocks. The setting is
    process-wide. Returns False where the C library is not glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    """Resident set size of this process now."""
    try:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize()
    except OSError:
        return peak_rss_bytes()


def working_budget(max_memory: int | None) -> int | None:
    """Bytes available for tensors in flight: ``max_memory`` less this process's footprint."""
    if max_memory is None:
        return None
    baseline = current_rss_bytes()
    if max_memory - baseline < MIN_WORKING_BYTES:
        log.warning("--max-memory %d MB leaves less than %d MB beyond what fusekit itself uses "
                    "(%d MB); using %d MB for tensors", max_memory // 10**6,
                    MIN_WORKING_BYTES // 2**20, baseline // 10**6, MIN_WORKING_BYTES // 2**20)
        return MIN_WORKING_BYTES
    return max_memory - baseline


def split_units(plan: Plan, budget: int | None) -> list[WorkUnit]:
    """Cut every task whose working set exceeds ``budget / UNITS_IN_FLIGHT`` into row blocks,
    when its method allows (elementwise, or blockwise: then once per pass); others stay whole."""
    units: list[WorkUnit] = []
    for task in plan.tasks:
        target = budget // UNITS_IN_FLIGHT if budget else None
        rows = task.shape[0] if len(task.shape) > 1 else 0
        passes = stats_passes(task)
        if (target is None or task.working_bytes() <= target or rows < 2 or passes is None
                or not task.compute_dtype.is_floating_point):
            units.append(WorkUnit(task))
            continue
        per_row = max(1, task.working_bytes(1))
        step = max(1, min(rows, target // per_row))
        blocks = [(r, min(rows, r + step)) for r in range(0, rows, step)]
        units += [WorkUnit(task, block, stage, passes) for stage in range(passes + 1) for block in blocks]
    return units


def stats_passes(task: TensorTask) -> int | None:
    """How many statistics passes a blockwise method makes over ``task`` (0 for elementwise
    methods); None when ``task`` cannot be cut into row blocks."""
    method = get_method(task.method)
    if method.blockwise is None:
        return 0 if method.elementwise else None
    context = TensorContext(task.model_params, task.params, task.shape, task.compute_dtype)
    return method.blockwise(context).passes


def held_budget(units: list[WorkUnit], budget: int | None) -> int | None:
    """The part of ``budget`` for held bytes: what is left after reserving the largest kernel's
    temporaries, which exist for one unit at a time (kernels run on one thread)."""
    if budget is None:
        return None
    reserved = max((u.transient_bytes for u in units), default=0) + idle_limit(units, budget)
    return max(1, budget - reserved)


def idle_limit(units: list[WorkUnit], budget: int | None) -> int:
    """How many bytes of idle read buffers the pool may keep: enough for one unit's inputs, which
    is what the next unit of the same shapes reuses."""
    largest = max((u.stored_bytes for u in units), default=0)
    return largest if budget is None else min(largest, budget // UNITS_IN_FLIGHT)


def peak_working_bytes(units: list[WorkUnit], budget: int | None) -> int:
    """The most working memory a run can hold at once: the largest sum of held bytes over
    consecutive units that the held budget admits together (a unit larger than it runs alone),
    plus the largest kernel's temporaries."""
    transient = max((u.transient_bytes for u in units), default=0)
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


class ByteBudget:
    """A counting semaphore over bytes; a request larger than the whole budget waits until
    nothing else is reserved, then proceeds alone."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.reserved = 0
        self._cond = threading.Condition()
        self.closed = False

    def acquire(self, amount: int) -> None:
        with self._cond:
            while not self.closed and self.limit is not None and self.reserved > 0 \
                    and self.reserved + amount > self.limit:
                self._cond.wait()
            self.reserved += amount

    def release(self, amount: int) -> None:
        with self._cond:
            self.reserved -= amount
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()


class Executor:
    """Executes a :class:`Plan` into an output folder."""

    def __init__(self, plan: Plan, *, device: torch.device, max_shard_bytes: int | None,
                 seed: int = 0, max_memory: int | None = None, pipelined: bool = True,
                 progress: bool = False, guard: OutputGuard | None = None) -> None:
        self.plan = plan
        self.guard = guard  # resume: skips tensors of kept shards; opens the checking writer
        self.seed = seed
        self.device = device
        self.max_shard_bytes = max_shard_bytes
        self.progress = progress
        self.pipelined = pipelined
        self.budget = working_budget(max_memory)
        self.units = [u for u in split_units(plan, self.budget)
                      if guard is None or not guard.skip(u.task.output)]
        self.pool = BufferPool(idle_limit(self.units, self.budget), pinned=device.type == "cuda")
        # Merges whose tensors can all be cut into row blocks stream memory; whole-tensor kernels
        # with many large temporaries (SCE, model_stock, ...) run faster with glibc reusing its heap.
        self.streaming = all(get_method(task.method).splits_rows for task in plan.tasks)
        self.readers = {ref: CheckpointReader(model) for ref, model in plan.models.items()}
        self._warned_large = False
        self._blockwise: dict[str, BlockwiseMerge] = {}  # tensors part way through their passes

    def run(self, out: Path) -> ExecutionStats:
        from tqdm import tqdm

        if self.streaming and os.environ.get("FUSEKIT_MMAP_THRESHOLD") != "0":
            map_large_allocations()
        # Kernels get every core; reading and writing are system calls on their own threads.
        torch.set_num_threads(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                              else os.cpu_count() or 1)
        start = time.perf_counter()
        specs = [TensorSpec(t.output, t.shape, t.out_dtype) for t in self.plan.tasks]
        writer = (self.guard.open_writer if self.guard is not None else ShardWriter)(
            out, specs, max_shard_bytes=self.max_shard_bytes, index_metadata={"fusekit_version": __version__})
        bar = tqdm(total=self.plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                   desc="merging", disable=not self.progress, leave=False)

        def write(unit: WorkUnit, result: torch.Tensor | None) -> None:
            if result is None:  # a statistics pass: nothing to write
                return
            writer.write(unit.task.output, result, first_row=unit.first_row)
            bar.update(unit.out_bytes)

        try:
            (self._run_pipelined if self.pipelined else self._run_sequential)(write)
            files = writer.finish()
        finally:
            bar.close()
            writer.close()
            for reader in self.readers.values():
                reader.close()
        return ExecutionStats(tensors=len(self.plan.tasks), bytes_read=self.plan.input_bytes,
                              bytes_written=self.plan.output_bytes,
                              seconds=time.perf_counter() - start,
                              peak_rss_bytes=peak_rss_bytes(), files=tuple(files))

    # -- scheduling -----------------------------------------------------------------------------

    def _run_sequential(self, write: Callable[[WorkUnit, torch.Tensor | None], None]) -> None:
        for unit in self.units:
            stored, buffers = self.read(unit)
            write(unit, self.compute(unit, stored))
            del stored
            self.recycle(buffers)

    def _run_pipelined(self, write: Callable[[WorkUnit, torch.Tensor | None], None]) -> None:
        budget = ByteBudget(held_budget(self.units, self.budget))
        Loaded = tuple[WorkUnit, list[torch.Tensor], list[torch.Tensor]]
        Computed = tuple[WorkUnit, list[torch.Tensor | None], list[torch.Tensor]]
        loaded: queue.Queue[Loaded | BaseException] = queue.Queue()
        results: queue.Queue[Computed | None] = queue.Queue()
        failure: list[BaseException] = []
        stop = threading.Event()

        def read_all() -> None:
            try:
                for unit in self.units:
                    self._warn_if_large(unit)
                    budget.acquire(unit.held_bytes)
                    if stop.is_set():
                        return
                    loaded.put((unit, *self.read(unit)))
            except BaseException as exc:  # handed to the main thread, which re-raises it
                loaded.put(exc)

        def write_all() -> None:
            while (item := results.get()) is not None:
                unit, (result,), buffers = item
                try:
                    if not failure:
                        write(unit, result)
                except BaseException as exc:
                    failure.append(exc)
                finally:
                    del item, result
                    budget.release(unit.held_bytes)
                try:
                    self.recycle(buffers)
                except BaseException as exc:  # keep draining so no thread waits forever
                    failure.append(exc)

        threads = [threading.Thread(target=read_all, name="fusekit-read", daemon=True),
                   threading.Thread(target=write_all, name="fusekit-write", daemon=True)]
        for thread in threads:
            thread.start()
        try:
            for _ in self.units:
                item = loaded.get()
                if isinstance(item, BaseException):
                    raise item
                if failure:
                    raise failure[0]
                unit, inputs, buffers = item
                results.put((unit, [self.compute(unit, inputs)], buffers))
                del item, inputs, buffers
        finally:
            stop.set()
            budget.close()
            results.put(None)
            threads[1].join()
            threads[0].join()  # a thread still in a torch op at exit aborts the process
        if failure:
            raise failure[0]

    def _warn_if_large(self, unit: WorkUnit) -> None:
        too_large = self.budget is not None and unit.working_bytes > self.budget
        if too_large and unit.rows is None and not self._warned_large:
            self._warned_large = True
            log.warning("tensor '%s' needs about %d MB, more than --max-memory allows; it runs "
                        "alone (its method cannot split it into row blocks)", unit.task.output,
                        math.ceil(unit.working_bytes / 1e6))

    # -- one unit -------------------------------------------------------------------------------

    def read(self, unit: WorkUnit) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The unit's input tensors (base last), as stored, on the CPU, and the pooled buffers
        holding them (to :meth:`recycle` once the unit is written, not before: a kernel may
        return an input itself)."""
        tensors, buffers = [], []
        for tensor_input in unit.task.all_inputs:
            reader = self.readers[tensor_input.model]
            buffer = self.pool.take(reader.nbytes(tensor_input.name, unit.rows))
            tensors.append(reader.get(tensor_input.name, unit.rows, out=buffer))
            buffers.append(buffer)
        return tensors, buffers

    def recycle(self, buffers: list[torch.Tensor]) -> None:
        for buffer in buffers:
            self.pool.give(buffer)

    def compute(self, unit: WorkUnit, stored: list[torch.Tensor]) -> torch.Tensor | None:
        """The unit's output block on the CPU, in the output dtype; None for a statistics pass."""
        task = unit.task
        if not task.compute_dtype.is_floating_point:
            return self._copy_exact(task, stored)
        # From pinned buffers the copies to a GPU run asynchronously; ``.cpu()`` below waits for
        # the kernel, so no buffer is recycled while a copy from it may still be running.
        tensors = [t.to(device=self.device, non_blocking=True).to(task.compute_dtype) for t in stored]
        base = tensors.pop() if task.base is not None else None
        inputs = MergeInputs(tensors=tensors, model_params=task.model_params, params=task.params,
                             base=base, seed=self.seed, tensor_name=task.output)
        method = get_method(task.method)
        try:
            if unit.rows is None or method.blockwise is None:  # a whole tensor, or elementwise rows
                result: torch.Tensor | None = method.kernel(inputs)
            else:
                result = self._blockwise_step(unit, inputs)
        except FusekitError as exc:
            raise type(exc)(f"tensor '{task.output}': {exc}") from None
        return None if result is None else result.to(dtype=task.out_dtype).cpu().contiguous()

    def _blockwise_step(self, unit: WorkUnit, inputs: MergeInputs) -> torch.Tensor | None:
        """Feed one block to its tensor's blockwise kernel (started at the tensor's first block);
        blocks come in stage and row order, as :func:`split_units` lists them."""
        task = unit.task
        merge = self._blockwise.get(task.output)
        if merge is None:
            start = get_method(task.method).blockwise
            assert start is not None
            merge = self._blockwise[task.output] = start(TensorContext(
                task.model_params, task.params, task.shape, task.compute_dtype, self.seed, task.output))
        if not unit.writes:
            merge.observe(unit.stage, inputs)
            if unit.last_block:
                merge.end_pass(unit.stage)
            return None
        result = merge.apply(inputs)
        if unit.last_block:
            del self._blockwise[task.output]
        return result

    @staticmethod
    def _copy_exact(task: TensorTask, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Integer and boolean tensors (buffers, masks) must agree and are copied, not merged."""
        for info, other in zip(task.all_inputs[1:], tensors[1:], strict=True):
            if not torch.equal(tensors[0], other):
                raise TensorMismatchError(
                    f"tensor '{task.output}' is not floating point and differs between "
                    f"'{task.all_inputs[0].model}' and '{info.model}'; such tensors cannot be merged")
        return tensors[0].to(task.out_dtype).contiguous()

