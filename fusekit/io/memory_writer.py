"""An in-memory sink for the executor: merged tensors kept as a state dict instead of shards.

:class:`MemoryWriter` takes the place of :class:`~fusekit.io.writer.ShardWriter` (the executor's
``sink`` option), so a candidate merge (``fusekit tune``) runs through the same plan, reader,
kernels and dtype casts as ``fusekit merge`` and holds exactly the bytes the merge would write.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fusekit.errors import NonFiniteError
from fusekit.io.layout import TensorSpec
from fusekit.io.writer import is_finite


class MemoryWriter:
    """Collects every planned tensor in :attr:`tensors` (name → CPU tensor in its output dtype).

    Takes the arguments of :class:`~fusekit.io.writer.ShardWriter` (``folder`` and the shard
    options are ignored), so it can stand in for it in :class:`~fusekit.plan.Executor`.

    Args:
        folder: unused (nothing is written to disk).
        specs: every output tensor; each is allocated once, row blocks are copied into it.
        check_finite: refuse a floating-point tensor holding NaN or infinity.

    Example:
        >>> sink = MemoryWriter(Path("."), [TensorSpec("w", (2,), torch.float32)])
        >>> sink.write("w", torch.ones(2)); sink.finish(); sink.tensors["w"].tolist()
        []
        [1.0, 1.0]
    """

    def __init__(self, folder: Path, specs: Sequence[TensorSpec], *, check_finite: bool = False,
                 **options: Any) -> None:
        del folder, options
        self.check_finite = check_finite
        self._specs = {spec.name: spec for spec in specs}
        self.tensors: dict[str, torch.Tensor] = {}
        self._remaining = {spec.name: spec.shape[0] if spec.shape else 1 for spec in specs}
        self._lock = threading.Lock()

    def write(self, name: str, tensor: torch.Tensor, *, first_row: int = 0) -> None:
        """Keep a planned tensor, or copy the block of its rows starting at ``first_row``."""
        spec = self._specs[name]
        rows = tensor.shape[0] if tensor.dim() else 1
        planned_rows = spec.shape[0] if spec.shape else 1
        if (tensor.dtype != spec.dtype or tuple(tensor.shape[1:]) != spec.shape[1:]
                or tensor.dim() != len(spec.shape) or first_row + rows > planned_rows):
            raise RuntimeError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype} at row "
                               f"{first_row}, planned {spec.shape} {spec.dtype}")
        if self.check_finite and tensor.is_floating_point() and not is_finite(tensor):
            raise NonFiniteError(f"tensor '{name}': the merged values hold NaN or infinity", name)
        with self._lock:
            if first_row == 0 and rows == self._remaining[name] and name not in self.tensors:
                # a copy: the executor may hand over a pooled read buffer that it reuses later
                self.tensors[name] = tensor.detach().clone()
            else:
                target = self.tensors.setdefault(name, torch.empty(spec.shape, dtype=spec.dtype))
                target[first_row:first_row + rows] = tensor
            self._remaining[name] -= rows

    def finish(self) -> list[Path]:
        """Check every tensor arrived whole; no files, so an empty list."""
        missing = sorted(name for name, left in self._remaining.items() if left)
        if missing:
            raise RuntimeError(f"{len(missing)} planned tensors were not fully written, e.g. {missing[0]}")
        return []

    def close(self) -> None:
        """Nothing to release."""
