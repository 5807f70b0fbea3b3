"""Run a plan: read inputs, apply the merge kernel, stream results into the shards.

The units and their memory come from :mod:`fusekit.plan.memory`, the order and threads from
:mod:`fusekit.plan.pipeline`, and the process settings of a run (torch threads, glibc's mmap
threshold) from :mod:`fusekit.plan.process`. This module does one unit's work: read its inputs
into pooled buffers, run its kernel (carrying a blockwise method's state from block to block), and
write its result at its offset in the output shards. The pipelined and sequential modes give
identical bytes.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusekit.errors import FusekitError, TensorMismatchError
from fusekit.io.buffers import BufferPool
from fusekit.io.journal import OutputGuard
from fusekit.io.layout import TensorSpec
from fusekit.io.reader import open_reader
from fusekit.io.writer import ShardWriter
from fusekit.ops import MergeInputs, get_method
from fusekit.ops.registry import BlockwiseMerge, TensorContext
from fusekit.plan.graph import Plan, TaskGraph, TensorTask
from fusekit.plan.memory import (
    WorkUnit,
    held_budget,
    idle_limit,
    peak_rss_bytes,
    split_units,
    vocab_reserved,
    working_budget,
)
from fusekit.plan.pipeline import UnitSteps, run_pipelined, run_sequential
from fusekit.plan.process import merge_settings
from fusekit.version import __version__
from fusekit.vocab import align_readers

log = logging.getLogger("fusekit")


@dataclass(frozen=True)
class ExecutionStats:
    """What a run did.

    Attributes:
        tensors: output tensors in the plan.
        bytes_read / bytes_written: input and output bytes of the plan.
        seconds: wall time of the run.
        peak_rss_bytes: the process's peak resident memory so far.
        files: the shards written.
    """

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    files: tuple[Path, ...]


class Executor:
    """Executes a plan's tasks into an output folder.

    Args:
        plan: the tasks and models to run: a merge :class:`Plan` or a :class:`TaskGraph`.
        device: where the kernels run.
        max_shard_bytes: largest output shard (None: one file).
        seed: seed of stochastic methods (generators derive from it per tensor).
        max_memory: bound on resident memory in bytes (None: whole tensors, unbounded).
        pipelined: overlap reading, computing and writing on three threads.
        progress: show a progress bar on stderr.
        guard: resume and checking: tensors of kept shards are skipped and the writer comes from it.
        sink: makes the writer instead (ShardWriter's arguments), e.g.
            :class:`~fusekit.io.memory_writer.MemoryWriter` to keep the tensors in memory.

    Example:
        >>> executor = Executor(plan, device=torch.device("cpu"), max_shard_bytes=None)  # doctest: +SKIP
        >>> stats = executor.run(temp_folder)  # doctest: +SKIP
    """

    def __init__(self, plan: TaskGraph | Plan, *, device: torch.device, max_shard_bytes: int | None,
                 seed: int = 0, max_memory: int | None = None, pipelined: bool = True,
                 progress: bool = False, guard: OutputGuard | None = None,
                 sink: Callable[..., Any] | None = None) -> None:
        self.graph = plan.graph if isinstance(plan, Plan) else plan
        self.guard = guard
        self.sink = sink
        self.seed = seed
        self.device = device
        self.max_shard_bytes = max_shard_bytes
        self.progress = progress
        self.pipelined = pipelined
        self.budget = vocab_reserved(plan, working_budget(max_memory))
        self.units = [u for u in split_units(self.graph, self.budget)
                      if guard is None or not guard.skip(u.task.output)]
        self.pool = BufferPool(idle_limit(self.units, self.budget), pinned=device.type == "cuda")
        # Merges whose tensors can all be cut into row blocks stream memory; whole-tensor kernels
        # with many large temporaries (SCE, model_stock, ...) run faster with glibc reusing its heap.
        self.streaming = all(get_method(task.method).splits_rows for task in self.graph.tasks)
        self.readers = {ref: open_reader(model) for ref, model in self.graph.models.items()}
        self.readers = align_readers(self.readers, plan.vocab if isinstance(plan, Plan) else None)
        self._warned_large = False
        self._blockwise: dict[str, BlockwiseMerge] = {}  # tensors part way through their passes

    def run(self, out: Path) -> ExecutionStats:
        """Compute every unit and write the shards (and index) into ``out``.

        torch's thread count is what it was before when this returns or raises.

        Args:
            out: the (temporary) output folder.

        Returns:
            What the run did.

        Raises:
            FusekitError: a kernel or the writer refused a tensor; the message names it.
        """
        from tqdm import tqdm

        start = time.perf_counter()
        specs = [TensorSpec(t.output, t.shape, t.out_dtype) for t in self.graph.tasks]
        with merge_settings(streaming=self.streaming):
            writer = (self.sink or (self.guard.open_writer if self.guard is not None else ShardWriter))(
                out, specs, max_shard_bytes=self.max_shard_bytes,
                index_metadata={"fusekit_version": __version__})
            bar = tqdm(total=self.graph.output_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                       desc="merging", disable=not self.progress, leave=False)

            def write(unit: WorkUnit, result: torch.Tensor | None) -> None:
                if result is None:  # a statistics pass: nothing to write
                    return
                writer.write(unit.task.output, result, first_row=unit.first_row)
                bar.update(unit.out_bytes)

            try:
                self._schedule(write)
                files = writer.finish()
            finally:
                bar.close()
                writer.close()
                for reader in self.readers.values():
                    reader.close()
        return ExecutionStats(tensors=len(self.graph.tasks), bytes_read=self.graph.input_bytes,
                              bytes_written=self.graph.output_bytes,
                              seconds=time.perf_counter() - start,
                              peak_rss_bytes=peak_rss_bytes(), files=tuple(files))

    def _schedule(self, write: Callable[[WorkUnit, torch.Tensor | None], None]) -> None:
        steps = UnitSteps(read=self.read, compute=self.compute, write=write, recycle=self.recycle,
                          announce=self._warn_if_large)
        if self.pipelined:
            run_pipelined(self.units, steps, held_budget(self.units, self.budget))
        else:
            run_sequential(self.units, steps)

    def _warn_if_large(self, unit: WorkUnit) -> None:
        too_large = self.budget is not None and unit.working_bytes > self.budget
        if too_large and unit.rows is None and not self._warned_large:
            self._warned_large = True
            log.warning("tensor '%s' needs about %d MB, more than --max-memory allows; it runs "
                        "alone (its method cannot split it into row blocks)", unit.task.output,
                        math.ceil(unit.working_bytes / 1e6))

    # -- one unit -------------------------------------------------------------------------------

    def read(self, unit: WorkUnit) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Read one unit's inputs into pooled buffers.

        Args:
            unit: the unit to read.

        Returns:
            The input tensors (base last), as stored, on the CPU, and the pooled buffers holding
            them (to :meth:`recycle` once the unit is written, not before: a kernel may return an
            input itself).
        """
        tensors, buffers = [], []
        for tensor_input in unit.task.all_inputs:
            reader = self.readers[tensor_input.model]
            buffer = self.pool.take(reader.nbytes(tensor_input.name, unit.rows))
            tensors.append(reader.get(tensor_input.name, unit.rows, out=buffer))
            buffers.append(buffer)
        return tensors, buffers

    def recycle(self, buffers: list[torch.Tensor]) -> None:
        """Give a written unit's read buffers back to the pool."""
        for buffer in buffers:
            self.pool.give(buffer)

    def compute(self, unit: WorkUnit, stored: list[torch.Tensor]) -> torch.Tensor | None:
        """Run one unit's kernel.

        Args:
            unit: the unit.
            stored: its inputs as :meth:`read` returned them.

        Returns:
            The output block on the CPU in the output dtype; None for a statistics pass.

        Raises:
            FusekitError: the kernel refused the inputs; the same exception (type, attributes
                and chain kept), its message prefixed with the tensor's name.
        """
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
            name_tensor(exc, task.output)
            raise
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


def name_tensor(exc: BaseException, tensor: str) -> None:
    """Prefix ``exc``'s message with ``tensor '<name>': `` in place (add a note when it has no
    single message).

    The exception stays the same object, so re-raising it keeps its type, its attributes (such as
    :attr:`fusekit.errors.NonFiniteError.tensor`) and its ``__cause__``/``__context__`` chain;
    building a new one with ``type(exc)(message)`` would lose them, or fail for classes whose
    constructors take other arguments.

    Args:
        exc: the exception to name the tensor in.
        tensor: the output tensor being computed.
    """
    if len(exc.args) <= 1:
        exc.args = (f"tensor '{tensor}': {exc}",)
    elif hasattr(exc, "add_note"):  # Python 3.11+
        exc.add_note(f"while computing tensor '{tensor}'")
