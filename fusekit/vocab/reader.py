"""Readers that serve embeddings and LM heads already permuted into the output vocabulary.

:class:`AlignedReader` has the interface of :class:`fusekit.io.reader.CheckpointReader` and wraps
whatever reader a model has (a checkpoint's, or one applying a LoRA adapter). A block of aligned
rows is read as runs of consecutive stored rows straight from the wrapped reader; filled rows
(:mod:`fusekit.vocab.rows`) are computed once per output tensor by :class:`AlignedRows`, shared by
the readers of a run, and padding rows are each model's mean over its aligned rows, summed block by
block. Nothing reads a whole tensor at once.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from fusekit.io.reader import TensorInfo
from fusekit.vocab.align import PAD_BLOCK_ROWS, VocabAlignment, is_vocab_tensor


def runs(rows: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """``(position, first stored row, length)`` of each run of consecutive rows (-1 entries skipped).

    >>> list(runs([4, 5, 6, -1, 9, 2, 3]))
    [(0, 4, 3), (4, 9, 1), (5, 2, 2)]
    """
    start = 0
    while start < len(rows):
        if rows[start] < 0:
            start += 1
            continue
        end = start + 1
        while end < len(rows) and rows[end] == rows[end - 1] + 1:
            end += 1
        yield start, rows[start], end - start
        start = end


def read_rows(reader: Any, name: str, rows: Sequence[int], into: torch.Tensor) -> None:
    """Copy stored rows ``rows`` of tensor ``name`` into the matching rows of ``into`` (-1: left as is)."""
    direct = reader.info(name).dtype == into.dtype and into.is_contiguous()
    for position, first, count in runs(rows):
        part = into[position:position + count]
        if direct:  # straight into the output block, no copy
            reader.get(name, (first, first + count), out=part.view(-1).view(torch.uint8))
        else:
            part.copy_(reader.get(name, (first, first + count)))


class AlignedRows:
    """The filled and padding rows of a run's aligned tensors, computed once and kept.

    Args:
        readers: every model's wrapped reader (stored tensors).
        alignment: the plan's alignment, with its groups attached.
    """

    def __init__(self, readers: Mapping[str, Any], alignment: VocabAlignment) -> None:
        self.readers = readers
        self.alignment = alignment
        self.stored: dict[str, dict[str, str]] = {}  # output → model → stored name
        for (model, _), (stored, output) in alignment.served.items():
            self.stored.setdefault(output, {})[model] = stored
        self._fills: dict[str, dict[int, torch.Tensor]] = {}
        self._pads: dict[tuple[str, str], torch.Tensor] = {}
        self._own: dict[tuple[str, str], list[int]] = {}
        self._lock = threading.RLock()

    def own(self, model: str, output: str) -> list[int]:
        """The model's stored row for each output id of ``output`` (-1: filled)."""
        with self._lock:
            key = (model, output)
            if key not in self._own:
                group = self.alignment.groups[output]
                self._own[key] = group.own_rows(self.alignment.permutations[model])
            return self._own[key]

    def fills(self, output: str, row_shape: tuple[int, ...]) -> dict[int, torch.Tensor]:
        """Output id → its filled row, for ``output``'s tokens that some model lacks."""
        with self._lock:
            if output not in self._fills:
                self._fills[output] = self._compute_fills(output, row_shape)
            return self._fills[output]

    def _compute_fills(self, output: str, row_shape: tuple[int, ...]) -> dict[int, torch.Tensor]:
        dtype, names = self.alignment.dtype, self.stored[output]
        wanted: dict[str, list[int]] = {}
        for rule in self.alignment.groups[output].fills.values():
            for model, row in rule.sources:
                wanted.setdefault(model, []).append(row)
        values: dict[tuple[str, int], torch.Tensor] = {}
        for model, rows in wanted.items():
            ordered = sorted(set(rows))
            block = torch.empty((len(ordered), *row_shape), dtype=dtype)
            read_rows(self.readers[model], names[model], ordered, block)
            values.update({(model, row): block[i] for i, row in enumerate(ordered)})
        result: dict[int, torch.Tensor] = {}
        for out_id, rule in self.alignment.groups[output].fills.items():
            filled = torch.zeros(row_shape, dtype=dtype)
            for source in rule.sources:  # mergekit: zeros + each row in turn, then / count
                filled = filled + values[source]
            result[out_id] = filled / len(rule.sources) if len(rule.sources) > 1 else filled
        return result

    def block(self, model: str, name: str, rows: tuple[int, int], into: torch.Tensor) -> torch.Tensor:
        """Rows ``rows`` of the aligned tensor that ``model`` serves as ``name``, written into ``into``."""
        stored, output = self.alignment.served[(model, name)]
        length = self.alignment.vocab.length
        own = self.own(model, output)[rows[0]:min(rows[1], length)]
        read_rows(self.readers[model], stored, own, into)
        fills = self.fills(output, tuple(into.shape[1:]))
        for position, row in enumerate(own):
            if row < 0:
                fill = fills.get(rows[0] + position)
                into[position] = 0 if fill is None else fill
        if rows[1] > length:
            into[max(0, length - rows[0]):] = self.pad_row(model, name, tuple(into.shape[1:]))
        return into

    def pad_row(self, model: str, name: str, row_shape: tuple[int, ...]) -> torch.Tensor:
        """The row padding ``model``'s aligned tensor: the mean of its rows for real tokens."""
        with self._lock:
            key = (model, name)
            if key not in self._pads:
                length = self.alignment.vocab.length
                total = torch.zeros(row_shape, dtype=torch.float64)
                for start in range(0, length, PAD_BLOCK_ROWS):
                    stop = min(length, start + PAD_BLOCK_ROWS)
                    part = torch.empty((stop - start, *row_shape), dtype=self.alignment.dtype)
                    total += self.block(model, name, (start, stop), part).sum(dim=0, dtype=torch.float64)
                self._pads[key] = (total / max(1, length)).to(self.alignment.dtype)
            return self._pads[key]


class AlignedReader:
    """A reader whose embedding and LM-head tensors are aligned to the output vocabulary.

    Every other tensor comes from the wrapped reader unchanged.

    Args:
        inner: the model's reader.
        ref: the model's reference.
        alignment: the plan's alignment (before :meth:`VocabAlignment.attach`, only shapes and
            dtypes are served; reading needs the attached one).
        rows: the run's shared filled rows (None before the alignment is attached).
    """

    def __init__(self, inner: Any, ref: str, alignment: VocabAlignment, rows: AlignedRows | None) -> None:
        self.inner = inner
        self.ref = ref
        self.alignment = alignment
        self.rows = rows

    @property
    def model(self) -> Any:
        """The wrapped reader's model."""
        return self.inner.model

    @property
    def infos(self) -> dict[str, TensorInfo]:
        """The wrapped reader's tensor infos, as stored."""
        return dict(self.inner.infos)

    def _stored(self, name: str) -> str | None:
        served = self.alignment.served.get((self.ref, name))
        if served is not None:
            return served[0]
        if not self.alignment.served and is_vocab_tensor(name) and name in self.inner:
            return name
        return None

    def __contains__(self, name: str) -> bool:
        return self._stored(name) is not None or name in self.inner

    def names(self) -> Iterator[str]:
        return iter(self.inner.names())

    def info(self, name: str) -> TensorInfo:
        stored = self._stored(name)
        if stored is None:
            return self.inner.info(name)
        info = self.inner.info(stored)
        return TensorInfo(name, (self.alignment.size, *info.shape[1:]), self.alignment.dtype, info.file,
                          info.offset)

    def nbytes(self, name: str, rows: tuple[int, int] | None = None) -> int:
        if self._stored(name) is None:
            return int(self.inner.nbytes(name, rows))
        info = self.info(name)
        count = info.shape[0] if rows is None else rows[1] - rows[0]
        return info.nbytes // max(1, info.shape[0]) * count

    def get(self, name: str, rows: tuple[int, int] | None = None, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Read a tensor, or rows ``[start, stop)`` of it; aligned for embeddings and LM heads."""
        if self._stored(name) is None:
            return self.inner.get(name, rows, out=out)
        assert self.rows is not None, "aligned tensors are read through an attached alignment"
        info = self.info(name)
        span = rows or (0, info.shape[0])
        shape = (span[1] - span[0], *info.shape[1:])
        into = out.view(info.dtype).view(shape) if out is not None and out.numel() else (
            torch.empty(shape, dtype=info.dtype))
        return self.rows.block(self.ref, name, span, into)

    def close(self) -> None:
        self.inner.close()

    def __enter__(self) -> AlignedReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def align_readers(readers: Mapping[str, Any], alignment: VocabAlignment | None) -> dict[str, Any]:
    """Wrap every reader so it serves aligned embeddings and LM heads (``readers`` as they are when
    ``alignment`` is None).

    Args:
        readers: model reference → its reader.
        alignment: the plan's alignment, or None.

    Returns:
        Model reference → reader.
    """
    if alignment is None:
        return dict(readers)
    rows = AlignedRows(readers, alignment) if alignment.served else None
    return {ref: AlignedReader(reader, ref, alignment, rows) for ref, reader in readers.items()}
