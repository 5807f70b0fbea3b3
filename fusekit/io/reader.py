"""Lazy, validated access to a checkpoint's tensors, one at a time.

Headers are parsed and checked by fusekit before any data is read, so a truncated file or a lying
header is a one-line error rather than a crash or a huge allocation, and ``fusekit plan`` can list
every tensor's name, shape and dtype without reading tensor data. Tensor bytes are read with
``pread`` straight into a fresh tensor: no file is memory-mapped, so resident memory holds only the
tensors in use, however large the checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusekit.arch.layers import layer_count_conflict
from fusekit.errors import CheckpointError, TensorMismatchError
from fusekit.io.layout import DTYPE_CODES, FLOAT8_DTYPES, SAFETENSORS_DTYPES, tensor_bytes
from fusekit.io.refs import ResolvedModel

MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_DIMS = 16  # no model tensor has more; a longer shape is a lying header
MAX_CONFIG_BYTES = 16 * 2**20  # real configs are a few KiB


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is, known from headers alone."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int = 0  # absolute byte offset of the data in ``file``

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate a safetensors header before any tensor data is touched.

    Checked: the file is a regular file; the header length is within :data:`MAX_HEADER_BYTES` and
    inside the file; the header is one JSON object without duplicate names; every entry has a known
    dtype, a shape of non-negative integers and offsets whose span equals shape × dtype size; and the
    tensors tile the data section exactly (no overlap, no gap, nothing after the last one), as the
    format requires. Any violation is a one-line :class:`CheckpointError` naming the file and tensor,
    so a lying header can never cause a read past the end or an allocation larger than the file.
    """
    try:
        if not stat.S_ISREG(path.stat().st_mode):
            raise CheckpointError(f"{path}: is not a regular file; a checkpoint must be a "
                                  ".safetensors file")
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file ({size} bytes); "
                                      "download or copy it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or header_len + 8 > size:
                raise CheckpointError(f"{path}: corrupt or truncated safetensors header (claims "
                                      f"{header_len} bytes in a {size}-byte file); download it again")
            raw = handle.read(header_len)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        if not raw.startswith(b"{"):
            raise ValueError
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_refuse_duplicates)
        if not isinstance(header, dict):
            raise ValueError
    except _DuplicateName as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header (tensor '{exc}' is listed "
                              "twice); download it again") from None
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object); "
                              "download it again") from None
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not (isinstance(metadata, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise CheckpointError(f"{path}: corrupt safetensors header (__metadata__ must map strings "
                              "to strings); download it again")
    data_len = size - 8 - header_len
    infos = {name: _tensor_info(path, name, entry, data_len, 8 + header_len)
             for name, entry in header.items()}
    _check_tiling(path, infos, data_len, 8 + header_len)
    return infos, metadata


class _DuplicateName(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateName(key[:200])
        result[key] = value
    return result


def _check_tiling(path: Path, infos: dict[str, TensorInfo], data_len: int, data_start: int) -> None:
    """Tensors must cover the data section back to back: overlaps and gaps mean a lying header."""
    position = 0
    for info in sorted(infos.values(), key=lambda i: (i.offset, i.nbytes)):
        begin = info.offset - data_start
        if begin != position:
            why = "overlaps the tensor before it" if begin < position else "leaves a gap before it"
            raise CheckpointError(f"{path}: tensor '{info.name}' {why} in the data section; the "
                                  "file is corrupt")
        position = begin + info.nbytes
    if position != data_len:
        raise CheckpointError(f"{path}: {data_len - position} bytes after the last tensor belong to "
                              "no tensor; the file is corrupt or was not written as safetensors")


def _tensor_info(path: Path, name: str, entry: Any, data_len: int, data_start: int) -> TensorInfo:
    def corrupt(why: str) -> CheckpointError:
        return CheckpointError(f"{path}: tensor '{name}' {why}; the file is corrupt or truncated")

    if not isinstance(entry, dict):
        raise corrupt("has no header entry")
    code = entry.get("dtype")
    dtype = SAFETENSORS_DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise corrupt(f"has unsupported dtype {str(code)[:40]!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS
            and all(_is_count(d) for d in shape)):
        raise corrupt(f"has an invalid shape {str(shape)[:80]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise corrupt(f"has invalid data offsets {str(offsets)[:80]}")
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * dtype.itemsize:
        raise corrupt(f"claims {end - begin} bytes for shape {shape} of {code}")
    if end > data_len:
        raise corrupt(f"ends at byte {end} but the file holds {data_len} data bytes")
    return TensorInfo(name, tuple(shape), dtype, path, data_start + begin)


def _is_count(value: Any) -> bool:
    """A non-negative JSON integer (``true`` is not 1 here)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_layer_count(model: ResolvedModel, names: Iterable[str]) -> None:
    """Refuse a checkpoint whose config.json counts other blocks than its tensors hold.

    A config that cannot be read is left to whoever reads it next (it is not this check's to judge).

    Raises:
        CheckpointError: one line naming config.json and the first contradiction.
    """
    path = model.config_path
    try:
        if not path.is_file() or path.stat().st_size > MAX_CONFIG_BYTES:
            return
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return
    if not isinstance(config, dict):
        return
    conflict = layer_count_conflict(config, names)
    if conflict is not None:
        files = ", ".join(f.name for f in model.weight_files[:2]) + (
            ", ..." if len(model.weight_files) > 2 else "")
        raise CheckpointError(f"{path}: {conflict} ({files}); the config and the weights do not "
                              "belong together: restore the config.json written with these weights")


def refuse_float8_without_dtype(readers: Iterable[CheckpointReader]) -> None:
    """Refuse float8 inputs when the recipe sets no ``dtype``: a merge cannot compute in float8.

    Raises:
        CheckpointError: one line naming the file and tensor, and the ``dtype`` key to set.
    """
    for reader in readers:
        for info in reader.infos.values():
            if info.dtype in FLOAT8_DTYPES:
                raise CheckpointError(
                    f"{info.file}: tensor '{info.name}' is stored as {DTYPE_CODES[info.dtype]} (float8), "
                    "which a merge cannot compute in; set dtype: float32 or bfloat16 in the recipe "
                    "(dequantize checkpoints that carry scale tensors first)")


class CheckpointReader:
    """Name → tensor access over one resolved model; files are opened (mmap) on first use."""

    def __init__(self, model: ResolvedModel) -> None:
        self.model = model
        self._infos: dict[str, TensorInfo] | None = None
        self._fds: dict[Path, int] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}

    @property
    def infos(self) -> dict[str, TensorInfo]:
        """Every tensor's info, read from headers (or from the pickle, when allowed).

        Raises:
            CheckpointError: a header is corrupt, two files define one tensor and no index says
                which counts, or config.json counts other blocks than the weights hold.
        """
        if self._infos is None:
            infos = self._pickle_infos() if self.model.is_pickle else self._header_infos()
            check_layer_count(self.model, infos)
            self._infos = infos
        return self._infos

    def _header_infos(self) -> dict[str, TensorInfo]:
        infos: dict[str, TensorInfo] = {}
        index = self.model.index
        for file in self.model.weight_files:
            for name, info in read_safetensors_header(file)[0].items():
                known = infos.get(name)
                if known is None or (index is not None and index.get(name) == file):
                    infos[name] = info
                elif index is None or index.get(name) != known.file:
                    raise CheckpointError(
                        f"{file}: tensor '{name}' is also in {known.file.name} and no index says which "
                        f"file holds it; remove the file that does not belong in {file.parent}")
        if index is not None:
            missing = [n for n, f in index.items() if n not in infos or infos[n].file != f]
            if missing:
                raise CheckpointError(
                    f"model '{self.model.ref}': tensor '{missing[0]}' is listed in the index but "
                    f"not found in {index[missing[0]].name}; the checkpoint is incomplete")
        return infos

    def _pickle_infos(self) -> dict[str, TensorInfo]:
        infos = {}
        for file in self.model.weight_files:
            for name, tensor in self._load_pickle(file).items():
                infos[name] = TensorInfo(name, tuple(tensor.shape), tensor.dtype, file)
        return infos

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickles:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for bad pickles
                raise CheckpointError(f"{file}: cannot load as a weights-only pickle ({exc})") from None
            if not isinstance(state, dict):
                raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict")
            self._pickles[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._pickles[file]

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    def names(self) -> Iterator[str]:
        return iter(self.infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.infos[name]
        except KeyError:
            raise TensorMismatchError(
                f"tensor '{name}' is missing from model '{self.model.ref}'; the models do not "
                "share an architecture (check the model paths)") from None

    def get(self, name: str, rows: tuple[int, int] | None = None, *,
            out: torch.Tensor | None = None) -> torch.Tensor:
        """Read one tensor, or rows ``[start, stop)`` of it, into memory (CPU).

        ``out``, a 1-D uint8 tensor of exactly the bytes needed, receives the data instead of a
        new allocation (see :class:`fusekit.io.buffers.BufferPool`).
        """
        info = self.info(name)
        if self.model.is_pickle:
            tensor = self._load_pickle(info.file)[name]
            return tensor if rows is None else tensor[rows[0]:rows[1]]
        shape, offset = info.shape, info.offset
        if rows is not None:
            row_bytes = info.nbytes // shape[0] if shape[0] else 0
            shape, offset = (rows[1] - rows[0], *shape[1:]), offset + rows[0] * row_bytes
        if out is None:
            tensor = torch.empty(shape, dtype=info.dtype)
        else:
            tensor = out.view(info.dtype).view(shape) if out.numel() else torch.empty(shape, dtype=info.dtype)
        self._read_into(info, tensor_bytes(tensor), offset)
        return tensor

    def nbytes(self, name: str, rows: tuple[int, int] | None = None) -> int:
        """Bytes :meth:`get` reads for ``name`` (and ``rows``)."""
        info = self.info(name)
        if rows is None or not info.shape or not info.shape[0]:
            return info.nbytes
        return info.nbytes // info.shape[0] * (rows[1] - rows[0])

    def _read_into(self, info: TensorInfo, view: memoryview, offset: int) -> None:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count == 0:
                raise CheckpointError(f"{info.file}: ends inside tensor '{info.name}'; the file "
                                      "was truncated after it was opened")
            done += count

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickles.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_reader(model: ResolvedModel) -> CheckpointReader:
    """A reader of ``model``: its checkpoint, or its base with its LoRA adapter applied on read.

    Args:
        model: a resolved reference; ``model.adapter`` set means the base with the adapter applied.

    Returns:
        A :class:`CheckpointReader`, or a :class:`fusekit.lora.apply.AdapterReader` (which is one).

    Example:
        >>> with open_reader(resolve_model("base+adapter")) as reader:  # doctest: +SKIP
        ...     reader.get("model.layers.0.self_attn.q_proj.weight")
    """
    if model.adapter is None:
        return CheckpointReader(model)
    from fusekit.lora.apply import AdapterReader  # imports this module: not at import time

    return AdapterReader(model)
