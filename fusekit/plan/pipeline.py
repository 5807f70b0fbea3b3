"""Schedule work units: in order on one thread, or as a read → compute → write pipeline.

In the pipelined mode a reader thread prefetches the next units' inputs, the calling thread runs the
kernels, and a writer thread writes results, so reading, arithmetic and writing overlap. Every unit
reserves its held bytes from a :class:`ByteBudget` before it is read and frees them once written.
An exception raised on the reader or writer thread is handed to the calling thread and raised there
as the same object: its type, attributes, ``__cause__`` and ``__context__`` are the ones it was
raised with. Both modes give identical bytes.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from fusekit.plan.memory import WorkUnit

Buffers = list[torch.Tensor]
_Loaded = tuple[WorkUnit, list[torch.Tensor], Buffers]
_Computed = tuple[WorkUnit, list[torch.Tensor | None], Buffers]


class ByteBudget:
    """A counting semaphore over bytes.

    A request larger than the whole budget waits until nothing else is reserved, then proceeds
    alone; after :meth:`close` nothing waits.

    Args:
        limit: bytes that may be reserved at once, or None for no limit.

    Example:
        >>> budget = ByteBudget(100)
        >>> budget.acquire(60); budget.release(60)
    """

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.reserved = 0
        self._cond = threading.Condition()
        self.closed = False

    def acquire(self, amount: int) -> None:
        """Reserve ``amount`` bytes, waiting until they fit (or the budget is closed)."""
        with self._cond:
            while not self.closed and self.limit is not None and self.reserved > 0 \
                    and self.reserved + amount > self.limit:
                self._cond.wait()
            self.reserved += amount

    def release(self, amount: int) -> None:
        """Give back ``amount`` reserved bytes and wake the waiters."""
        with self._cond:
            self.reserved -= amount
            self._cond.notify_all()

    def close(self) -> None:
        """Stop all waiting, now and later (the run is ending)."""
        with self._cond:
            self.closed = True
            self._cond.notify_all()


@dataclass(frozen=True)
class UnitSteps:
    """What the scheduler does with one unit, step by step.

    Attributes:
        read: the unit's input tensors and the pooled buffers holding them.
        compute: the unit's result from its inputs (None: nothing to write).
        write: store a result.
        recycle: hand the buffers back once the unit is written (not before: a kernel may
            return an input itself).
        announce: called before a unit reserves memory, on the reader thread (pipelined mode
            only; for warnings).
    """

    read: Callable[[WorkUnit], tuple[list[torch.Tensor], Buffers]]
    compute: Callable[[WorkUnit, list[torch.Tensor]], torch.Tensor | None]
    write: Callable[[WorkUnit, torch.Tensor | None], None]
    recycle: Callable[[Buffers], None]
    announce: Callable[[WorkUnit], None] = lambda unit: None


def run_sequential(units: Sequence[WorkUnit], steps: UnitSteps) -> None:
    """Read, compute and write every unit in order on the calling thread.

    Args:
        units: the run's units, in order.
        steps: what to do with each.
    """
    for unit in units:
        stored, buffers = steps.read(unit)
        steps.write(unit, steps.compute(unit, stored))
        del stored
        steps.recycle(buffers)


def run_pipelined(units: Sequence[WorkUnit], steps: UnitSteps, held_limit: int | None) -> None:
    """Read on one thread, compute on the calling one, write on a third, within ``held_limit``.

    Args:
        units: the run's units, in order.
        steps: what to do with each.
        held_limit: bytes of held memory units may reserve at once (None: no limit).

    Raises:
        BaseException: the first exception any step raised, on whichever thread, as raised.
    """
    _Pipeline(list(units), steps, ByteBudget(held_limit)).run()


@dataclass
class _Pipeline:
    units: list[WorkUnit]
    steps: UnitSteps
    budget: ByteBudget
    loaded: queue.Queue[_Loaded | BaseException] = field(default_factory=queue.Queue)
    results: queue.Queue[_Computed | None] = field(default_factory=queue.Queue)
    failure: list[BaseException] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def run(self) -> None:
        threads = [threading.Thread(target=self._read_all, name="fusekit-read", daemon=True),
                   threading.Thread(target=self._write_all, name="fusekit-write", daemon=True)]
        for thread in threads:
            thread.start()
        try:
            self._compute_all()
        finally:
            self.stop.set()
            self.budget.close()
            self.results.put(None)
            threads[1].join()
            threads[0].join()  # a thread still in a torch op at exit aborts the process
        if self.failure:
            raise self.failure[0]

    def _compute_all(self) -> None:
        for _ in self.units:
            item = self.loaded.get()
            if isinstance(item, BaseException):
                raise item  # the reader's exception itself: type, attributes and chain intact
            if self.failure:
                raise self.failure[0]
            unit, inputs, buffers = item
            self.results.put((unit, [self.steps.compute(unit, inputs)], buffers))
            del item, inputs, buffers

    def _read_all(self) -> None:
        try:
            for unit in self.units:
                self.steps.announce(unit)
                self.budget.acquire(unit.held_bytes)
                if self.stop.is_set():
                    return
                self.loaded.put((unit, *self.steps.read(unit)))
        except BaseException as exc:  # handed to the calling thread, which raises it
            self.loaded.put(exc)

    def _write_all(self) -> None:
        while (item := self.results.get()) is not None:
            unit, (result,), buffers = item
            try:
                if not self.failure:
                    self.steps.write(unit, result)
            except BaseException as exc:
                self.failure.append(exc)
            finally:
                del item, result
                self.budget.release(unit.held_bytes)
            try:
                self.steps.recycle(buffers)
            except BaseException as exc:  # keep draining so no thread waits forever
                self.failure.append(exc)
