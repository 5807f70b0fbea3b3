"""The safetensors file format and transformers' sharding convention, for writers that stream.

Because every output tensor's name, shape and dtype is known before any is computed, headers can be
written first and tensor bytes streamed to their offsets afterwards, so no shard is ever held whole
in memory.
"""

from __future__ import annotations

import ctypes
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fusekit.io.refs import SAFETENSORS_INDEX

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_CODES = {dtype: code for code, dtype in SAFETENSORS_DTYPES.items()}
FLOAT8_DTYPES = frozenset({torch.float8_e4m3fn, torch.float8_e5m2})
SINGLE_FILE = "model.safetensors"
INDEX_FILE = SAFETENSORS_INDEX  # one spelling of the index name for io/ and its readers


@dataclass(frozen=True)
class TensorSpec:
    """An output tensor's name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], max_shard_bytes: int | None) -> list[list[TensorSpec]]:
    """Group tensors in order into shards of at most ``max_shard_bytes`` (a larger tensor alone)."""
    shards: list[list[TensorSpec]] = [[]]
    used = 0
    for spec in specs:
        if max_shard_bytes is not None and shards[-1] and used + spec.nbytes > max_shard_bytes:
            shards.append([])
            used = 0
        shards[-1].append(spec)
        used += spec.nbytes
    return shards


def shard_file_names(count: int) -> list[str]:
    """``model.safetensors`` alone, or ``model-0000i-of-0000N.safetensors``."""
    if count == 1:
        return [SINGLE_FILE]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def encode_header(specs: Sequence[TensorSpec],
                  metadata: Mapping[str, str] | None = None) -> tuple[bytes, dict[str, int]]:
    """The length-prefixed JSON header for ``specs`` laid back to back, and each tensor's file offset."""
    header: dict[str, object] = {"__metadata__": {"format": "pt", **(metadata or {})}}
    offset = 0
    relative: dict[str, int] = {}
    for spec in specs:
        header[spec.name] = {"dtype": DTYPE_CODES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        relative[spec.name] = offset
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to an 8-byte boundary
    start = 8 + len(text)
    return len(text).to_bytes(8, "little") + text, {n: start + o for n, o in relative.items()}


def shard_index(shards: Sequence[Sequence[TensorSpec]], file_names: Sequence[str],
                metadata: Mapping[str, object] | None = None) -> dict[str, object]:
    """``model.safetensors.index.json`` content: total size and tensor → file map."""
    weight_map = {spec.name: name for name, specs in zip(file_names, shards, strict=True)
                  for spec in specs}
    total = sum(spec.nbytes for specs in shards for spec in specs)
    return {"metadata": {"total_size": total, **(metadata or {})}, "weight_map": weight_map}


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A contiguous CPU tensor's raw bytes, writable and without a copy.

    The view keeps the tensor alive, so ``tensor_bytes(t.to(dtype))`` is safe to use.
    """
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        raise ValueError("tensor_bytes needs a contiguous CPU tensor")
    size = tensor.numel() * tensor.element_size()
    if size == 0:
        return memoryview(bytearray())
    buffer = (ctypes.c_ubyte * size).from_address(tensor.data_ptr())
    buffer.owner = tensor  # type: ignore[attr-defined]  # ties the tensor's lifetime to the view
    return memoryview(buffer).cast("B")
