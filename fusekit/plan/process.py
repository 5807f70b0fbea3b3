"""Process-wide settings a merge run changes, scoped so the caller gets its process back.

Two settings matter to the executor:

- torch's intra-op thread count: the kernels get every core the process may use, and the count
  the caller had is restored when the run ends, whether it succeeds or fails
  (:func:`merge_settings`).
- glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD)``). Tensors are allocated on one thread and
  freed on another; glibc's default, a threshold that rises with the sizes freed, then keeps tens
  of megabytes per tensor size in its heaps. A fixed threshold of 4 MiB returns every large tensor
  to the system when freed: on a 2B-parameter linear merge peak resident memory fell by about a
  third at no cost in speed, on a 1B TIES merge in row blocks from 1.25 GB to 0.92 GB.

  The threshold **cannot be scoped**: glibc offers no call that reads it back, and setting it once
  switches off the rising default for the rest of the process (``mallopt`` sets
  ``no_dyn_threshold`` and nothing clears it). Setting 128 KiB back afterwards would leave a
  fixed, lower threshold, not the default. So the library never touches it on its own: the
  ``fusekit`` command opts in with :func:`allow_malloc_tuning` (its process ends with the command),
  as may any program that owns its process. ``FUSEKIT_MMAP_THRESHOLD=0`` turns it off even then.

This module imports torch only when a run starts, so the CLI can opt in before loading it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from contextlib import contextmanager

_M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD = 4 * 2**20
_malloc_tuning = False  # set by the fusekit command (allow_malloc_tuning), never by the library


def allow_malloc_tuning(allowed: bool = True) -> None:
    """Let merge runs in this process fix glibc's mmap threshold (see the module docstring).

    The setting outlives the run and cannot be undone, so only a program that owns its process
    (the ``fusekit`` command does) should call this.

    Args:
        allowed: True to let streaming runs set the threshold; False to stop later runs from it.

    Example:
        >>> allow_malloc_tuning()  # doctest: +SKIP
    """
    global _malloc_tuning
    _malloc_tuning = allowed


def malloc_tuning_allowed() -> bool:
    """Whether a streaming run may set glibc's mmap threshold.

    Returns:
        True when :func:`allow_malloc_tuning` opted in and ``FUSEKIT_MMAP_THRESHOLD`` is not ``0``.
    """
    return _malloc_tuning and os.environ.get("FUSEKIT_MMAP_THRESHOLD") != "0"


def map_large_allocations(threshold: int = MMAP_THRESHOLD) -> bool:
    """Have glibc serve allocations above ``threshold`` with their own memory maps, for good.

    Process-wide and permanent (see the module docstring); call it only where
    :func:`malloc_tuning_allowed` says so.

    Args:
        threshold: allocation size in bytes from which glibc maps memory directly.

    Returns:
        Whether glibc took the setting (False where the C library is not glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


def usable_cores() -> int:
    """How many CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@contextmanager
def merge_settings(*, streaming: bool) -> Iterator[None]:
    """Set up the process for a merge run and put torch's thread count back afterwards.

    Kernels get every usable core (reading and writing are system calls on their own threads).
    The previous ``torch.get_num_threads()`` is restored on exit, also when the run fails.

    Args:
        streaming: every tensor of the run can be cut into row blocks; then, where
            :func:`malloc_tuning_allowed`, glibc's mmap threshold is fixed (not restorable).

    Example:
        >>> with merge_settings(streaming=False):  # doctest: +SKIP
        ...     executor_body()
    """
    import torch

    if streaming and malloc_tuning_allowed():
        map_large_allocations()
    threads = torch.get_num_threads()
    torch.set_num_threads(usable_cores())
    try:
        yield
    finally:
        torch.set_num_threads(threads)
