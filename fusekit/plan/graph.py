"""The merge plan: one task per output tensor, fully resolved before any tensor data is read.

:class:`TensorTask` says how one output tensor is made; :class:`TaskGraph` is a run's tasks and the
models they read (what the executor takes); :class:`Plan` adds what a merge writes beside the
weights (recipe, config, tokenizer source).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel

from fusekit.io.refs import ResolvedModel
from fusekit.recipe.schema import MergeRecipe
from fusekit.vocab.align import VocabAlignment


@dataclass(frozen=True)
class TensorInput:
    """One input tensor: which model, which name there, and what the header says it is.

    Attributes:
        model: the model's reference (a key of the plan's ``models``).
        name: the tensor's name in that model's checkpoint.
        shape / dtype: as its header records them.
    """

    model: str
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the tensor as stored."""
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
        """The inputs, then the base's tensor when there is one (the order the executor reads)."""
        return self.inputs if self.base is None else (*self.inputs, self.base)

    @property
    def numel(self) -> int:
        """Elements of the output tensor."""
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        """Bytes of the output tensor in its output dtype."""
        return self.numel * self.out_dtype.itemsize

    def block_numel(self, rows: int | None = None) -> int:
        """Elements of the whole tensor, or of ``rows`` of its rows.

        Args:
            rows: a number of leading-dimension rows, or None for the whole tensor.

        Returns:
            The element count.
        """
        return self.numel if rows is None else self.numel // max(1, self.shape[0]) * rows

    def stored_bytes(self, rows: int | None = None) -> int:
        """Bytes of the inputs as stored, for the whole tensor or ``rows`` of it.

        Args:
            rows: a number of rows, or None for the whole tensor.

        Returns:
            The sum over :attr:`all_inputs` in their stored dtypes.
        """
        numel = self.block_numel(rows)
        return sum(numel * i.dtype.itemsize for i in self.all_inputs)

    def memory(self, rows: int | None = None) -> tuple[int, int]:
        """(held, transient) bytes for this task, or for ``rows`` of its rows.

        Held bytes live from reading to writing: the stored inputs and the output block.
        Transient bytes exist only while the kernel runs: compute-dtype copies of the inputs when
        the dtype changes, and the kernel's temporaries as its method declares them.

        Args:
            rows: a number of rows, or None for the whole tensor.

        Returns:
            (held bytes, transient bytes).
        """
        from fusekit.ops import get_method

        numel = self.block_numel(rows)
        converted = sum(numel * self.compute_dtype.itemsize for i in self.all_inputs
                        if i.dtype != self.compute_dtype)
        per_element = get_method(self.method).scratch(len(self.all_inputs), self.compute_dtype.itemsize)
        held = self.stored_bytes(rows) + numel * self.out_dtype.itemsize
        return held, converted + numel * per_element

    def working_bytes(self, rows: int | None = None) -> int:
        """All the memory this task (or ``rows`` of it) needs at its peak.

        Args:
            rows: a number of rows, or None for the whole tensor.

        Returns:
            Held plus transient bytes (see :meth:`memory`).
        """
        return sum(self.memory(rows))


@dataclass(frozen=True)
class TaskGraph:
    """Output tensors to compute and the models they read: all that the executor needs.

    A merge :class:`Plan` gives one through :attr:`Plan.graph`; other producers of tensors (the
    MoE upcycler) build one from their own tasks, with no merge recipe.

    Attributes:
        models: every model a task reads, resolved, by reference.
        tasks: output tensors in write order.

    Example:
        >>> graph = TaskGraph(models={}, tasks=())
        >>> graph.output_bytes
        0
    """

    models: Mapping[str, ResolvedModel]
    tasks: tuple[TensorTask, ...]

    @property
    def input_bytes(self) -> int:
        """Bytes read: each distinct input tensor counted once."""
        seen = {(i.model, i.name): i.nbytes for task in self.tasks for i in task.all_inputs}
        return sum(seen.values())

    @property
    def output_bytes(self) -> int:
        """Bytes written: every output tensor in its output dtype."""
        return sum(task.out_bytes for task in self.tasks)

    def peak_task(self) -> TensorTask | None:
        """The task needing the most working memory at once, or None when there are no tasks."""
        return max(self.tasks, key=TensorTask.working_bytes, default=None)


@dataclass(frozen=True)
class Plan:
    """A merge: its recipe, the task of every output tensor, and what goes beside the weights.

    ``fusekit plan`` prints it; :attr:`graph` is what the executor runs. Build one with
    :func:`fusekit.plan.build_plan` (or ``fusekit.plan_merge`` from a recipe file).

    Attributes:
        recipe: the validated recipe; recipe_text: its YAML as written (copied into the output).
        models: every referenced model, resolved, by reference.
        donor: the model whose config, tokenizer and generation config the output takes.
        tasks: output tensors in write order.
        out_config: config.json for the output.
        tokenizer_source: the model whose tokenizer files are copied.
        chat_template: a template to install in the output's tokenizer, or None to keep its own.
        vocab: how embeddings and LM heads are permuted into the output vocabulary (tokenizer
            surgery), or None when they are read as stored.
    """

    recipe: MergeRecipe
    recipe_text: str
    models: dict[str, ResolvedModel]
    donor: str
    tasks: tuple[TensorTask, ...]
    out_config: dict[str, Any]
    tokenizer_source: ResolvedModel | None
    chat_template: str | None = None
    vocab: VocabAlignment | None = None

    @property
    def graph(self) -> TaskGraph:
        """The tasks and the models they read, as the executor takes them."""
        return TaskGraph(models=self.models, tasks=self.tasks)

    @property
    def input_bytes(self) -> int:
        """Bytes read: each distinct input tensor counted once."""
        return self.graph.input_bytes

    @property
    def output_bytes(self) -> int:
        """Bytes written: every output tensor in its output dtype."""
        return self.graph.output_bytes

    def peak_task(self) -> TensorTask | None:
        """The task needing the most working memory at once, or None when there are no tasks."""
        return self.graph.peak_task()
