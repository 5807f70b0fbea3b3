"""The merge plan: one task per output tensor, fully resolved before any tensor data is read."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from fusekit.io.refs import ResolvedModel
from fusekit.recipe.schema import MergeRecipe


@dataclass(frozen=True)
class TensorInput:
    """One input tensor: which model, which name there, and what the header says it is."""

    model: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass(frozen=True)
class TensorTask:
    """How to produce one output tensor.

    Attributes:
        output: the tensor's name in the merged model.
        method: the registered merge method.
        inputs: the contributing tensors, aligned with ``model_params``.
        model_params / params: validated per-model and method-wide parameters.
        base: the base model's tensor for methods that take one.
        compute_dtype: dtype the kernel works in; out_dtype: dtype written.
        t: relative depth in [0, 1] used for gradients (0 for embeddings and head).
    """

    output: str
    method: str
    inputs: tuple[TensorInput, ...]
    model_params: tuple[BaseModel, ...]
    params: BaseModel
    base: TensorInput | None
    shape: tuple[int, ...]
    compute_dtype: torch.dtype
    out_dtype: torch.dtype
    t: float

    @property
    def all_inputs(self) -> tuple[TensorInput, ...]:
        return self.inputs if self.base is None else (*self.inputs, self.base)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.numel * self.out_dtype.itemsize

    def block_numel(self, rows: int | None = None) -> int:
        """Elements of the whole tensor, or of ``rows`` of its rows."""
        return self.numel if rows is None else self.numel // max(1, self.shape[0]) * rows

    def stored_bytes(self, rows: int | None = None) -> int:
        """Bytes of the inputs as stored, for the whole tensor or ``rows`` of it."""
        numel = self.block_numel(rows)
        return sum(numel * i.dtype.itemsize for i in self.all_inputs)

    def memory(self, rows: int | None = None) -> tuple[int, int]:
        """(held, transient) bytes for this task, or for ``rows`` of its rows.

        Held bytes live from reading to writing: the stored inputs and the output block.
        Transient bytes exist only while the kernel runs: compute-dtype copies of the inputs when
        the dtype changes, and the kernel's temporaries as its method declares them.
        """
        from fusekit.ops import get_method

        numel = self.block_numel(rows)
        converted = sum(numel * self.compute_dtype.itemsize for i in self.all_inputs
                        if i.dtype != self.compute_dtype)
        per_element = get_method(self.method).scratch(len(self.all_inputs), self.compute_dtype.itemsize)
        held = self.stored_bytes(rows) + numel * self.out_dtype.itemsize
        return held, converted + numel * per_element

    def working_bytes(self, rows: int | None = None) -> int:
        """All the memory this task (or ``rows`` of it) needs at its peak."""
        return sum(self.memory(rows))


@dataclass(frozen=True)
class Plan:
    """Everything ``execute`` needs, and what ``fusekit plan`` prints.

    Attributes:
        recipe: the validated recipe; recipe_text: its YAML as written (copied into the output).
        models: every referenced model, resolved, by reference.
        donor: the model whose config, tokenizer and generation config the output takes.
        tasks: output tensors in write order.
        out_config: config.json for the output.
        tokenizer_source: the model whose tokenizer files are copied.
        chat_template: a template to install in the output's tokenizer, or None to keep its own.
    """

    recipe: MergeRecipe
    recipe_text: str
    models: dict[str, ResolvedModel]
    donor: str
    tasks: tuple[TensorTask, ...]
    out_config: dict[str, Any]
    tokenizer_source: ResolvedModel | None
    chat_template: str | None = None

    @property
    def input_bytes(self) -> int:
        """Bytes read: each distinct input tensor counted once."""
        seen = {(i.model, i.name): i.nbytes for task in self.tasks for i in task.all_inputs}
        return sum(seen.values())

    @property
    def output_bytes(self) -> int:
        return sum(task.out_bytes for task in self.tasks)

    def peak_task(self) -> TensorTask | None:
        return max(self.tasks, key=TensorTask.working_bytes, default=None)
