"""The registry of merge methods: name → kernel plus its parameter models.

A kernel is a pure function over tensors. It never sees recipes, files or shards: the planner resolves
every parameter for every tensor and model, validates it through the method's pydantic models, and
hands the kernel plain tensors and frozen parameter objects.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict


class Params(BaseModel):
    """Base for parameter models: frozen, unknown names rejected.

    Example:
        >>> class ScaleParams(Params):
        ...     scale: float = 1.0
        >>> ScaleParams(scale=0.5).scale
        0.5
    """

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class NoParams(Params):
    """For methods without parameters of that scope."""


@dataclass(frozen=True)
class MergeInputs:
    """What a kernel receives for one output tensor.

    Attributes:
        tensors: the contributing models' tensors, in recipe order, already in compute dtype.
        model_params: one validated per-model parameter object per entry of ``tensors``.
        params: the validated method-wide parameters.
        base: the base model's tensor for methods that use one, else None.
        seed: the run's random seed; with ``tensor_name`` it seeds :meth:`generator`.
        tensor_name: the output tensor's name.
    """

    tensors: Sequence[torch.Tensor]
    model_params: Sequence[BaseModel]
    params: BaseModel
    base: torch.Tensor | None = None
    seed: int = 0
    tensor_name: str = ""

    def generator(self, model_index: int) -> torch.Generator:
        """A CPU generator seeded by (seed, tensor name, model index).

        Stochastic kernels draw on the CPU from this and move the draw to the tensors' device, so a
        run gives the same bytes on CPU and GPU, in any tensor order and with any thread count.

        Args:
            model_index: the position of the model in ``tensors``.

        Returns:
            A fresh generator (see :func:`seeded_generator`).
        """
        return seeded_generator(self.seed, self.tensor_name, model_index)


def seeded_generator(seed: int, tensor_name: str, model_index: int) -> torch.Generator:
    """A CPU generator whose state depends only on its three arguments.

    Args:
        seed: the run's random seed.
        tensor_name: the output tensor's name.
        model_index: the model's position among the kernel's inputs.

    Returns:
        A ``torch.Generator`` on the CPU, seeded from a SHA-256 of the three.

    Example:
        >>> a = torch.rand(2, generator=seeded_generator(0, "w", 1))
        >>> bool((a == torch.rand(2, generator=seeded_generator(0, "w", 1))).all())
        True
    """
    digest = hashlib.sha256(f"{seed}\0{tensor_name}\0{model_index}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


class Kernel(Protocol):
    def __call__(self, inputs: MergeInputs) -> torch.Tensor: ...


@dataclass(frozen=True)
class TensorContext:
    """What a blockwise kernel knows of its output tensor before it sees any block of it."""

    model_params: Sequence[BaseModel]
    params: BaseModel
    shape: tuple[int, ...]
    dtype: torch.dtype
    seed: int = 0
    tensor_name: str = ""

    def generator(self, model_index: int) -> torch.Generator:
        """The generator :meth:`MergeInputs.generator` gives for the same tensor and model."""
        return seeded_generator(self.seed, self.tensor_name, model_index)


class BlockwiseMerge(Protocol):
    """A kernel that sees its tensor in row blocks: ``passes`` statistics passes, each over every
    block in row order and closed by :meth:`end_pass`, then :meth:`apply` on every block in row
    order. Any cut into blocks, one block included, gives the same bytes. ``passes`` is None when
    these parameters need the whole tensor at once: then :meth:`apply` gets it as one block."""

    @property
    def passes(self) -> int | None: ...

    def observe(self, stage: int, block: MergeInputs) -> None: ...

    def end_pass(self, stage: int) -> None: ...

    def apply(self, block: MergeInputs) -> torch.Tensor: ...


BlockwiseStart = Callable[[TensorContext], BlockwiseMerge]


def tensor_context(inputs: MergeInputs) -> TensorContext:
    """The context of a call on a whole tensor (the base's, or the first input's, shape and dtype)."""
    like = inputs.base if inputs.base is not None else inputs.tensors[0]
    return TensorContext(inputs.model_params, inputs.params, tuple(like.shape), like.dtype,
                         inputs.seed, inputs.tensor_name)


def whole_tensor(start: BlockwiseStart) -> Kernel:
    """The plain kernel of a blockwise method: every pass over one block, the whole tensor."""

    def kernel(inputs: MergeInputs) -> torch.Tensor:
        merge = start(tensor_context(inputs))
        for stage in range(merge.passes or 0):
            merge.observe(stage, inputs)
            merge.end_pass(stage)
        return merge.apply(inputs)

    return kernel


BaseUse = Literal["required", "optional", "unused"]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: the ``merge_method`` value in recipes.
        kernel: the tensor function.
        model_params: pydantic model of parameters given per input model.
        method_params: pydantic model of parameters shared by all models.
        base: whether the method needs ``base_model``, can use one, or ignores it. For
            "required" and "optional" the base's tensor comes as ``MergeInputs.base`` and the other
            models as ``tensors``; for "unused" a listed base is just one more entry of ``tensors``.
        min_models / max_models: bounds on ``len(tensors)``.
        summary: one line for the README and ``--help``.
        stochastic: whether the kernel draws random numbers (then the run's seed matters).
        elementwise: whether the kernel treats every element on its own, so that running it on
            blocks of rows gives exactly the bytes of one call on the whole tensor; the executor
            then splits tensors too large for the memory budget.
        scratch: bytes of temporaries per output element, given (number of input tensors, compute
            dtype itemsize); feeds the memory estimate and budget. The default assumes about one
            float32-or-wider copy per input plus two.
        result_dtype: dtype the kernel's result has for a given compute dtype; it is what gets
            written when the recipe sets no ``out_dtype`` (some kernels promote to float32).
        blockwise: for methods that need statistics of the whole tensor (TIES' magnitude cut-off,
            L1 norms), starts a :class:`BlockwiseMerge`, so that large tensors can still be cut
            into row blocks; ``kernel`` is then ``whole_tensor(blockwise)``.
    """

    name: str
    kernel: Kernel
    model_params: type[Params]
    method_params: type[Params]
    base: BaseUse
    min_models: int
    max_models: int | None
    summary: str
    stochastic: bool = False
    elementwise: bool = False
    scratch: Callable[[int, int], int] = field(default=lambda n, size: (n + 2) * max(size, 4))
    result_dtype: Callable[[torch.dtype], torch.dtype] = field(default=lambda dtype: dtype)
    blockwise: BlockwiseStart | None = None

    @property
    def splits_rows(self) -> bool:
        """Whether the executor may cut this method's tensors into row blocks (elementwise, or
        blockwise)."""
        return self.elementwise or self.blockwise is not None

    def parameter_names(self) -> dict[str, str]:
        """Every accepted parameter name and its scope.

        Returns:
            Name as recipes spell it → ``"model"`` (per-model) or ``"method"`` (method-wide).
        """
        names = {_yaml_name(n, f.alias): "model" for n, f in self.model_params.model_fields.items()}
        names.update({_yaml_name(n, f.alias): "method"
                      for n, f in self.method_params.model_fields.items()})
        return names


def _yaml_name(field_name: str, alias: str | None) -> str:
    return alias or field_name


_METHODS: dict[str, MergeMethod] = {}


def register(name: str, *, model_params: type[Params] = NoParams,
             method_params: type[Params] = NoParams, base: BaseUse = "unused",
             min_models: int = 1, max_models: int | None = None,
             summary: str, stochastic: bool = False, elementwise: bool = False,
             scratch: Callable[[int, int], int] | None = None,
             result_dtype: Callable[[torch.dtype], torch.dtype] | None = None,
             blockwise: BlockwiseStart | None = None,
             ) -> Callable[[Kernel], Kernel]:
    """Decorator registering a kernel as the merge method ``name``.

    Args:
        name: the ``merge_method`` value recipes use.
        model_params / method_params: pydantic models of per-model and method-wide parameters.
        base: whether the method needs a base model ("required"), can use one ("optional") or
            treats it as one more input ("unused").
        min_models / max_models: bounds on the number of input tensors.
        summary: one line for the README and ``--help``.
        stochastic: the kernel draws random numbers.
        elementwise: the kernel treats every element on its own (row blocks allowed).
        scratch: temporaries per output element, given (inputs, compute itemsize).
        result_dtype: the dtype the kernel returns for a compute dtype.
        blockwise: start of a :class:`BlockwiseMerge` for methods needing whole-tensor statistics.

    Returns:
        A decorator that registers the kernel and returns it unchanged.

    Raises:
        ValueError: ``name`` is already registered (a bug, not a user mistake).

    Example:
        >>> @register("halve_demo", summary="half of one tensor", elementwise=True)  # doctest: +SKIP
        ... def halve(inputs: MergeInputs) -> torch.Tensor:
        ...     return inputs.tensors[0] * 0.5
    """

    def add(kernel: Kernel) -> Kernel:
        if name in _METHODS:
            raise ValueError(f"merge method {name!r} is registered twice")
        extra: dict[str, Any] = {"scratch": scratch} if scratch is not None else {}
        if result_dtype is not None:
            extra["result_dtype"] = result_dtype
        if blockwise is not None:
            extra["blockwise"] = blockwise
        _METHODS[name] = MergeMethod(name, kernel, model_params, method_params, base,
                                     min_models, max_models, summary, stochastic, elementwise,
                                     **extra)
        return kernel

    return add


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """``result_dtype`` of kernels whose float32 masks or scales promote half-precision results."""
    return torch.promote_types(dtype, torch.float32)


def get_method(name: str) -> MergeMethod:
    """The method registered as ``name``.

    Args:
        name: a ``merge_method`` value.

    Returns:
        Its :class:`MergeMethod`.

    Raises:
        KeyError: ``name`` is not registered (callers turn it into a user error).

    Example:
        >>> get_method("linear").elementwise  # doctest: +SKIP
        True
    """
    return _METHODS[name]


def method_names() -> list[str]:
    """Registered method names, sorted.

    Returns:
        Every name :func:`get_method` accepts.
    """
    return sorted(_METHODS)
