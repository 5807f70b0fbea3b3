"""A pool of reusable read buffers.

Merges read tensors of the same few sizes over and over (every layer has the same shapes). Taking
each read buffer from a pool keyed by exact byte size, instead of a fresh allocation, saves the
kernel's page faults and zeroing on every read and keeps the C allocator from fragmenting when one
thread allocates and another frees; idle buffers are capped so the pool cannot grow unbounded.
For a CUDA merge the buffers are page-locked (pinned), so that host-to-device copies can run
asynchronously and at full bus speed.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class BufferPool:
    """Byte buffers (1-D uint8 CPU tensors) recycled by exact size; thread-safe."""

    def __init__(self, max_idle_bytes: int | None, *, pinned: bool = False) -> None:
        self.max_idle_bytes = max_idle_bytes
        self.pinned = pinned
        self._idle: OrderedDict[int, list[torch.Tensor]] = OrderedDict()
        self._idle_bytes = 0
        self._lock = threading.Lock()

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(self, nbytes: int) -> torch.Tensor:
        """A buffer of exactly ``nbytes`` bytes, reused when one is idle."""
        with self._lock:
            buffers = self._idle.get(nbytes)
            if buffers:
                self._idle_bytes -= nbytes
                buffer = buffers.pop()
                if not buffers:
                    del self._idle[nbytes]
                return buffer
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)

    def give(self, buffer: torch.Tensor) -> None:
        """Return a buffer from :meth:`take`; the least recently used sizes are freed first when
        the idle cap is exceeded."""
        nbytes = buffer.numel()
        with self._lock:
            self._idle.setdefault(nbytes, []).append(buffer)
            self._idle.move_to_end(nbytes)
            self._idle_bytes += nbytes
            while self.max_idle_bytes is not None and self._idle_bytes > self.max_idle_bytes:
                size, buffers = next(iter(self._idle.items()))
                buffers.pop()
                self._idle_bytes -= size
                if not buffers:
                    del self._idle[size]

    def clear(self) -> None:
        with self._lock:
            self._idle.clear()
            self._idle_bytes = 0
