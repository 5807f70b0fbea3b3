"""Run a plan: read each task's inputs, apply the merge kernel, stream the result to the shards.

Inputs are read one task at a time, so resident memory is bounded by the largest task (see
``TensorTask.working_bytes``), not by model size. The kernel runs on the chosen device in the task's
compute dtype; the result is cast to the output dtype on the device and copied back for writing.
"""

from __future__ import annotations

import resource
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fusekit import __version__
from fusekit.errors import FusekitError, TensorMismatchError
from fusekit.io.layout import TensorSpec
from fusekit.io.reader import CheckpointReader
from fusekit.io.writer import ShardWriter
from fusekit.ops import MergeInputs, get_method
from fusekit.plan.graph import Plan, TensorInput, TensorTask


@dataclass(frozen=True)
class ExecutionStats:
    """What a run did: counts, sizes, time and the process's peak resident memory."""

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    peak_rss_bytes: int
    files: tuple[Path, ...]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA request without CUDA is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise FusekitError(f"--device '{name}' is not a device; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise FusekitError("--device cuda was asked for but no CUDA GPU is available; use "
                           "--device cpu or auto")
    return device


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Executor:
    """Executes a :class:`Plan` into an output folder, one tensor at a time."""

    def __init__(self, plan: Plan, *, device: torch.device, max_shard_bytes: int | None,
                 seed: int = 0, progress: bool = False) -> None:
        self.plan = plan
        self.seed = seed
        self.device = device
        self.max_shard_bytes = max_shard_bytes
        self.progress = progress
        self.readers = {ref: CheckpointReader(model) for ref, model in plan.models.items()}

    def run(self, out: Path) -> ExecutionStats:
        from tqdm import tqdm

        start = time.perf_counter()
        specs = [TensorSpec(t.output, t.shape, t.out_dtype) for t in self.plan.tasks]
        writer = ShardWriter(out, specs, max_shard_bytes=self.max_shard_bytes,
                             index_metadata={"fusekit_version": __version__})
        bar = tqdm(total=self.plan.output_bytes, unit="B", unit_scale=True, unit_divisor=1024,
                   desc="merging", disable=not self.progress, leave=False)
        try:
            for task in self.plan.tasks:
                writer.write(task.output, self.compute(task))
                bar.update(task.out_bytes)
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

    def load(self, tensor: TensorInput, dtype: torch.dtype) -> torch.Tensor:
        data = self.readers[tensor.model].get(tensor.name)
        return data.to(device=self.device, dtype=dtype)

    def compute(self, task: TensorTask) -> torch.Tensor:
        """The output tensor for ``task``, on CPU, in the output dtype."""
        if not task.compute_dtype.is_floating_point:
            return self._copy_exact(task)
        tensors = [self.load(i, task.compute_dtype) for i in task.inputs]
        base = self.load(task.base, task.compute_dtype) if task.base is not None else None
        method = get_method(task.method)
        try:
            result = method.kernel(MergeInputs(tensors=tensors, model_params=task.model_params,
                                               params=task.params, base=base, seed=self.seed,
                                               tensor_name=task.output))
        except FusekitError as exc:
            raise type(exc)(f"tensor '{task.output}': {exc}") from None
        return result.to(dtype=task.out_dtype).cpu().contiguous()

    def _copy_exact(self, task: TensorTask) -> torch.Tensor:
        """Integer and boolean tensors (buffers, masks) must agree and are copied, not merged."""
        tensors = [self.readers[i.model].get(i.name) for i in task.all_inputs]
        for info, other in zip(task.all_inputs[1:], tensors[1:], strict=True):
            if not torch.equal(tensors[0], other):
                raise TensorMismatchError(
                    f"tensor '{task.output}' is not floating point and differs between "
                    f"'{task.all_inputs[0].model}' and '{info.model}'; such tensors cannot be merged")
        return tensors[0].to(task.out_dtype)
