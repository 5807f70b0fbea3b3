"""Gradient search (``optimizer: adam``): learn merge coefficients by backpropagation.

For ``linear`` and the weighted task-vector methods (``task_arithmetic``, ``ties``,
``dare_linear``, ``dare_ties``, and the breadcrumbs/DELLA rows alike) every merged tensor is a
differentiable function of the coefficients once the sparsification and sign-election masks are
fixed (Yadav et al.'s TIES masks, Yu et al.'s DARE drops: computed ONCE at the starting point, with
fusekit's own kernels and seed, then held)::

    linear:        W(θ) = Σ_i c_i θ_i            (÷ Σ_i c_i when normalize)
    task vectors:  W(θ) = θ_base + λ Σ_i c_i m_i τ̃_i   (÷ Σ_i c_i m_i when normalize)

where ``c_i`` is model i's ``weight`` at the tensor's depth ``t``: a global coefficient, or the
knots of a ``groups`` gradient interpolated with :func:`fusekit.recipe.params.interpolate_gradient`,
exactly as the merge resolves it (Lotfi et al.'s and AdaMerging's per-layer coefficients). A
``lambda`` search is learned too; other dimensions (``density``, ...) stay at the starting point.

Each search dimension is a free variable ``z`` with ``x = sigmoid(z)`` its point of the unit cube
(so every step is a valid recipe), mapped to [low, high] as :class:`~fusekit.tune.space.SearchSpace`
maps it. One step runs ONE transformers model (the output architecture) through
:func:`torch.func.functional_call` on all data windows (batched, the windows of ``fusekit score``),
giving the exact bits per byte of the current point (the data's mean next-token loss scaled by
tokens/bytes/ln 2) and its gradient, then takes one :class:`torch.optim.Adam` step.

Memory: the base and the models' masked task vectors are held once in float32, ``(n_models + 1) ×``
the model's float32 size (plus one byte per element and model for TIES' normalising masks), besides
one merged copy with its gradient and the forward's activations.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from fusekit.errors import FusekitError
from fusekit.tune.evaluate import Evaluation, Evaluator, parse_candidate, worker_name

if TYPE_CHECKING:
    from fusekit.lm.load import LoadedLM
    from fusekit.plan import Plan
    from fusekit.plan.graph import TensorTask
    from fusekit.tune.spec import TuneSpec

GRADIENT_METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
                    "breadcrumbs_ties", "della", "della_linear")
"""Methods whose merged weights :class:`GradientSearch` differentiates (masks fixed)."""

_EDGE = 1e-4  # starting points are kept this far inside the unit cube (sigmoid's finite range)
_BATCH = 8  # windows per forward pass, as fusekit score batches them
ALL_MODELS = -1
"""``_Knot.model`` of a top-level ``parameters.weight``: every model without a weight of its own."""


@dataclass(frozen=True)
class _Knot:
    """A learned dimension: ``dim`` of the space sets ``name`` (``weight`` or ``lambda``) of
    ``models[model]`` (``model`` None: method-wide; :data:`ALL_MODELS`: a top-level weight), knot
    ``knot`` of ``groups`` (``groups`` 0: a single value); its unit value is ``sigmoid(z[var])``."""

    dim: int
    name: str
    model: int | None
    knot: int
    groups: int
    var: int


def learned_dimensions(dims: Sequence[Any], *, per_layer: bool) -> list[_Knot]:
    """The dimensions adam learns (``weight`` and ``lambda`` search spaces) and their free variables.

    With ``per_layer`` every knot of a grouped space (``groups: N``) has its own variable (one
    coefficient per model and layer group); without it a space's knots share one (one coefficient
    per model).

    Raises:
        FusekitError: ``per_layer`` but no learned space has groups, or a weight searched where adam
            cannot follow it (inside ``slices``).

    Example:
        >>> from fusekit.tune.space import Dimension
        >>> dims = [Dimension("models[0].parameters.weight"), Dimension("parameters.density")]
        >>> [(k.dim, k.model) for k in learned_dimensions(dims, per_layer=False)]
        [(0, 0)]
    """
    from fusekit.tune.space import parameter_name

    knots: list[_Knot] = []
    variables: dict[tuple[Any, ...], int] = {}
    for index, dim in enumerate(dims):
        loc = tuple(dim.location())
        name = parameter_name(loc)
        if name not in ("weight", "lambda") or dim.choices is not None:
            continue
        model = _model_of(loc, dim.path)
        grouped = dim.group is not None
        tie = (loc, dim.group) if per_layer else (loc,)
        var = variables.setdefault(tie, len(variables))
        knots.append(_Knot(index, name, model, dim.group or 0, dim.groups if grouped else 0, var))
    if per_layer and knots and not any(k.groups for k in knots):
        raise FusekitError("tune.per_layer: learning one coefficient per layer group needs groups: N on "
                           "the weight search spaces (e.g. weight: {search: [0, 1], groups: 4})")
    return knots


def _model_of(loc: tuple[Any, ...], path: str) -> int | None:
    """``models[k]`` → k; a top-level parameter → :data:`ALL_MODELS` for ``weight``, else None."""
    if len(loc) == 4 and loc[0] == "models" and isinstance(loc[1], int) and loc[2] == "parameters":
        return int(loc[1])
    if len(loc) == 2 and loc[0] == "parameters":
        return ALL_MODELS if loc[1] == "weight" else None
    raise FusekitError(f"optimizer adam: cannot learn {path} (only models[i].parameters and the top-level "
                       "parameters); give it a value, or use optimizer cma or random")


def knot_weights(knot: _Knot, t: float) -> float:
    """How much ``knot``'s value counts in the coefficient at depth ``t`` (fusekit's interpolation)."""
    from fusekit.recipe.params import interpolate_gradient

    if knot.groups == 0:
        return 1.0
    return interpolate_gradient([1.0 if g == knot.knot else 0.0 for g in range(knot.groups)], t)


@dataclass
class _Term:
    """One output tensor as a function of the coefficients.

    ``stack``: ``(n_inputs, *shape)`` — the models' tensors (linear) or their masked task vectors;
    ``base``: the base's tensor (task vectors) or None; ``agree``: the sign-agreement masks when a
    normalising divisor needs them; ``rows``: ``(n_inputs, D)`` interpolation weights of the
    dimensions in each input's coefficient, ``fixed``: ``(n_inputs,)`` the coefficient when no
    dimension sets it; ``scale_row``/``scale_fixed`` the same for ``lambda``.
    """

    name: str
    stack: torch.Tensor | None
    base: torch.Tensor | None
    agree: torch.Tensor | None
    rows: torch.Tensor
    fixed: torch.Tensor
    scale_row: torch.Tensor
    scale_fixed: float
    normalize: bool
    consensus: bool
    constant: torch.Tensor | None = None

    def value(self, values: torch.Tensor) -> torch.Tensor:
        """The merged tensor for dimension values ``values`` ``(D,)``."""
        if self.constant is not None:
            return self.constant
        assert self.stack is not None
        coef = self.rows @ values + self.fixed  # (n_inputs,)
        column = coef.view(-1, *([1] * (self.stack.dim() - 1)))
        mixed = (column * self.stack).sum(dim=0)
        if self.normalize:
            mixed = mixed / self._divisor(coef, column)
        if self.base is None:
            return mixed
        scale = self.scale_row @ values + self.scale_fixed
        return self.base + scale * mixed

    def _divisor(self, coef: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
        if self.base is None:  # linear: Σ c_i
            return coef.sum()
        if self.agree is None:  # no election: Σ c_i, counted as 1 when nearly 0
            total = coef.sum()
            return torch.where(total.abs() < 1e-8, torch.ones_like(total), total)
        total = (column * self.agree).sum(dim=0)
        return torch.where(total == 0, torch.ones_like(total), total)


# -- from a plan to differentiable terms ----------------------------------------------------------


@dataclass(frozen=True)
class TermSetup:
    """What :func:`build_terms` needs besides the plan.

    Attributes:
        models: the recipe's ``models[i].model`` references, in order (what the paths index).
        knots: the learned dimensions.
        start: every dimension's recipe value at the starting point ``(D,)`` (0 for categorical).
        seed: the seed the masks are drawn with (the Evaluator's, so that the masks agree).
        constants: the starting merge's tensors (what other methods' tensors stay).
        device: where the terms live.
    """

    models: Sequence[str]
    knots: Sequence[_Knot]
    start: torch.Tensor
    seed: int
    constants: dict[str, torch.Tensor]
    device: torch.device


def build_terms(plan: Plan, setup: TermSetup) -> list[_Term]:
    """One :class:`_Term` per output tensor of ``plan`` (the merge at the starting point).

    Raises:
        FusekitError: a tensor's weight does not come from its searched weight (a filter or slice
            parameter overrides it), or the recipe rebuilds the vocabulary: adam cannot follow it.
    """
    from fusekit.io.reader import open_reader

    if plan.vocab is not None:
        raise FusekitError("optimizer adam: this recipe rebuilds the vocabulary (tokenizer surgery); "
                           "use optimizer cma or random")
    readers = {ref: open_reader(model) for ref, model in plan.models.items()}
    try:
        return [_term(task, readers, setup) for task in plan.tasks]
    finally:
        for reader in readers.values():
            reader.close()


def _term(task: TensorTask, readers: dict[str, Any], setup: TermSetup) -> _Term:
    """The term of one output tensor: its stacked inputs, masks and coefficient rows."""
    rows, fixed = _coefficient_rows(task, setup)
    lambda_ = float(getattr(task.params, "lambda_", 1.0))
    scale_row, scale_fixed = _row(task, [k for k in setup.knots if k.model is None], lambda_, setup)
    differentiable = (task.method in GRADIENT_METHODS and task.compute_dtype.is_floating_point
                      and bool(task.inputs))
    device = setup.device
    if not differentiable:
        constant = setup.constants[task.output].to(device=device, dtype=torch.float32)
        return _Term(task.output, None, None, None, rows, fixed, scale_row, scale_fixed, False, False,
                     constant=constant)
    tensors = [readers[i.model].get(i.name).to(task.compute_dtype) for i in task.inputs]
    normalize = bool(getattr(task.params, "normalize", False))
    if task.method == "linear":
        stack = torch.stack(tensors).float()  # (n_inputs, *shape)
        return _Term(task.output, stack.to(device), None, None, rows.to(device), fixed.to(device),
                     scale_row.to(device), scale_fixed, normalize, False)
    assert task.base is not None
    base = readers[task.base.model].get(task.base.name).to(task.compute_dtype)
    deltas, agree = _masked_deltas(task, tensors, base, setup.seed)
    kept = agree.to(device) if agree is not None and normalize else None  # bool: a byte an element
    return _Term(task.output, deltas.float().to(device), base.float().to(device), kept, rows.to(device),
                 fixed.to(device), scale_row.to(device), scale_fixed, normalize, agree is not None)


def _coefficient_rows(task: TensorTask, setup: TermSetup) -> tuple[torch.Tensor, torch.Tensor]:
    """``(n_inputs, D)`` interpolation weights and ``(n_inputs,)`` fixed coefficients of a task:
    a model's own searched weight, else a searched top-level weight when it is the one the merge
    used, else the merge's value."""
    rows = torch.zeros(len(task.inputs), len(setup.start), dtype=torch.float32)
    fixed = torch.zeros(len(task.inputs), dtype=torch.float32)
    shared = [k for k in setup.knots if k.model == ALL_MODELS]
    for j, (tensor_input, params) in enumerate(zip(task.inputs, task.model_params, strict=True)):
        weight = float(getattr(params, "weight", 1.0))
        own = [k for k in setup.knots if k.model is not None and 0 <= k.model < len(setup.models)
               and setup.models[k.model] == tensor_input.model]
        rows[j], fixed[j] = _row(task, own, weight, setup, fallback=shared)
    return rows, fixed


def _row(task: TensorTask, knots: Sequence[_Knot], value: float, setup: TermSetup,
         fallback: Sequence[_Knot] = ()) -> tuple[torch.Tensor, float]:
    """The interpolation row of ``knots`` at the task's depth if at the start it gives ``value`` (the
    value the merge used), else (``fallback``'s row likewise, else) zeros and ``value`` itself."""
    for group, required in ((knots, True), (fallback, False)):
        if not group:
            continue
        row = torch.zeros(len(setup.start), dtype=torch.float32)
        for knot in group:
            row[knot.dim] = knot_weights(knot, task.t)
        if math.isclose(float(row.double() @ setup.start.double()), value, rel_tol=1e-5, abs_tol=1e-6):
            return row, 0.0
        if required:
            raise FusekitError(f"optimizer adam: tensor '{task.output}' takes {knots[0].name} {value:g}, "
                               f"not the searched value; a filter or slice parameter overrides the search, "
                               "so use optimizer cma or random")
    return torch.zeros(len(setup.start), dtype=torch.float32), value


def _masked_deltas(task: TensorTask, tensors: list[torch.Tensor], base: torch.Tensor,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sparsified task vectors with the sign-agreement mask applied (``(n_inputs, *shape)``),
    and that mask (None without election): fusekit's own kernels, at the starting weights."""
    from fusekit.ops.registry import MergeInputs, tensor_context
    from fusekit.ops.task_vectors import METHODS, TaskVectorPasses, sign_agreement, weight_column

    row = next(m for m in METHODS if m.name == task.method)
    inputs = MergeInputs(tensors=tensors, model_params=task.model_params, params=task.params, base=base,
                         seed=seed, tensor_name=task.output)
    passes = TaskVectorPasses(row, tensor_context(inputs))
    for stage in range(passes.passes or 0):
        passes.observe(stage, inputs)
        passes.end_pass(stage)
    deltas = torch.stack([tensor - base if stream is None else stream.apply(tensor - base)
                          for tensor, stream in zip(tensors, passes.streams, strict=True)])
    if row.consensus is None:
        return deltas, None
    agree = sign_agreement(deltas * weight_column(passes.weights, deltas), row.consensus)
    return deltas * agree.to(deltas.dtype), agree


# -- the search -------------------------------------------------------------------------------------


def dimension_values(space: Any, x: torch.Tensor) -> torch.Tensor:
    """Each dimension's recipe value at unit point ``x`` ``(D,)``: linear or log between its bounds
    (categorical dimensions give 0; no coefficient reads them)."""
    values = []
    for index, dim in enumerate(space.dims):
        if dim.choices is not None:
            values.append(torch.zeros((), dtype=x.dtype))
        elif dim.scale == "log":
            low, high = math.log(dim.low), math.log(dim.high)
            values.append(torch.exp(low + (high - low) * x[index]))
        else:
            values.append(dim.low + (dim.high - dim.low) * x[index])
    return torch.stack(values)


class _Problem:
    """The data windows, the reused model and the terms: bits per byte and its gradient."""

    def __init__(self, search: GradientSearch) -> None:
        from fusekit.lm.score import text_windows
        from fusekit.plan import build_plan
        from fusekit.tune.evaluate import candidate_seed, merge_in_memory

        spec, evaluator = search.spec, search.evaluator
        recipe = spec.space.recipe_for(search.start)
        parsed, text = parse_candidate(recipe, spec.path.name)
        if parsed.merge_method not in GRADIENT_METHODS:
            raise FusekitError(f"{spec.path.name}: optimizer adam differentiates "
                               f"{', '.join(GRADIENT_METHODS)}; merge_method {parsed.merge_method} "
                               "needs optimizer cma or random")
        plan = build_plan(parsed, recipe_text=text)
        seed = candidate_seed(parsed, spec.settings.seed)
        self.lm: LoadedLM = evaluator.model_for(plan)
        constants = merge_in_memory(plan, seed=seed, device=evaluator.device,
                                    max_memory=evaluator.memory_budget())
        models = [str(entry.get("model")) for entry in recipe.get("models", [])]
        start = dimension_values(spec.space, torch.tensor(search.start, dtype=torch.float64))
        setup = TermSetup(models, search.knots, start, seed, constants, self.lm.device)
        self.terms = build_terms(plan, setup)
        self.windows, scores = text_windows(self.lm, evaluator.texts()[0])
        self.n_bytes = sum(s.n_bytes for s in scores)
        self.charged = sum(s.nll_nats for s in scores)  # first tokens without BOS, if any

    def bits_per_byte(self, values: torch.Tensor) -> float:
        """Bits per byte of the merge at dimension ``values``; gradients flow into ``values``."""
        merged = {term.name: term.value(values) for term in self.terms}
        leaves = {name: w.detach().requires_grad_(w.requires_grad) for name, w in merged.items()}
        nll = self.charged
        order = sorted(range(len(self.windows)), key=lambda i: -len(self.windows[i].ids))
        for lo in range(0, len(order), _BATCH):
            batch_nll = self._batch_nll(leaves, [self.windows[i] for i in order[lo:lo + _BATCH]])
            if batch_nll.requires_grad:
                (batch_nll / (math.log(2) * self.n_bytes)).backward()
            nll += float(batch_nll.detach())
        pairs = [(w, leaves[name].grad) for name, w in merged.items() if w.requires_grad]
        if pairs:
            torch.autograd.backward([w for w, _ in pairs], [g for _, g in pairs])
        return nll / math.log(2) / self.n_bytes

    def _batch_nll(self, leaves: dict[str, torch.Tensor], chunk: Sequence[Any]) -> torch.Tensor:
        """Summed next-token NLL (nats) of the scored positions of one batch of windows."""
        from torch.func import functional_call

        from fusekit.lm.score import window_batch

        ids, mask, scored = window_batch(chunk)
        ids, mask, scored = ids.to(self.lm.device), mask.to(self.lm.device), scored.to(self.lm.device)
        logits = functional_call(self.lm.model, leaves, args=(),
                                 kwargs={"input_ids": ids, "attention_mask": mask, "use_cache": False}).logits
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        return torch.where(scored, -logprobs, torch.zeros((), dtype=logprobs.dtype)).double().sum()


class GradientSearch:
    """The ``adam`` optimizer: coefficients learned by gradient descent on the data's loss.

    Each :meth:`step` evaluates the current point on all the data (its exact bits per byte, as the
    functional forward of the merged float32 weights measures it) and then takes one Adam step; it
    counts as one evaluation of the budget. :meth:`best` scores the best point seen through
    :class:`~fusekit.tune.evaluate.Evaluator` (merged as ``fusekit merge`` merges it), so that its
    score compares with the other optimizers'.

    Args:
        spec: the search (``settings.learning_rate``, ``evaluations``/``wall_time_s``).
        device: where the model runs (``cpu``, ``cuda``).
        max_memory: the Evaluator's bound for in-memory merges.

    Raises:
        FusekitError: the space has no ``weight`` or ``lambda`` search, or the method is not one
            of :data:`GRADIENT_METHODS` (raised by the first :meth:`step`).

    Example:
        >>> search = GradientSearch(load_tune_spec("tune.yaml"))  # doctest: +SKIP
        >>> while not search.done():  # doctest: +SKIP
        ...     point, evaluation = search.step()
    """

    def __init__(self, spec: TuneSpec, *, device: str = "cpu", max_memory: int | None = None) -> None:
        self.spec = spec
        self.evaluator = Evaluator(spec, device=device, max_memory=max_memory, with_test=True)
        self.knots = learned_dimensions(spec.space.dims, per_layer=spec.settings.per_layer)
        if not self.knots:
            raise FusekitError(f"{spec.path.name}: optimizer adam learns weights and lambda; search at "
                               "least one model's weight (weight: {search: [0, 1]})")
        self.start = [float(v) for v in spec.space.default_point()]
        logits: dict[int, list[float]] = {}
        for knot in self.knots:
            inner = min(max(self.start[knot.dim], _EDGE), 1 - _EDGE)
            logits.setdefault(knot.var, []).append(math.log(inner / (1 - inner)))
        self.z = torch.tensor([sum(v) / len(v) for _, v in sorted(logits.items())], dtype=torch.float64,
                              requires_grad=True)
        self.optimizer = torch.optim.Adam([self.z], lr=spec.settings.learning_rate)
        self.steps = 0
        self.elapsed = 0.0
        self.best_point: list[float] | None = None
        self.best_score = math.inf
        self._problem: _Problem | None = None

    def point(self) -> list[float]:
        """The current point of the unit cube (learned dimensions from ``z``, others the start)."""
        point = list(self.start)
        units = torch.sigmoid(self.z.detach()).tolist()
        for knot in self.knots:
            point[knot.dim] = float(units[knot.var])
        return point

    def step(self) -> tuple[list[float], Evaluation]:
        """Score the current point on the data, then take one Adam step.

        Returns:
            The point scored (before this step's update) and its :class:`Evaluation` (``score``:
            bits per byte on the data from the functional forward; no test score).
        """
        started = time.perf_counter()
        if self._problem is None:
            self._problem = _Problem(self)
        point = self.point()
        self.optimizer.zero_grad()
        x = torch.tensor(point, dtype=torch.float64)
        units = torch.sigmoid(self.z)
        for knot in self.knots:
            x = x.index_put((torch.tensor(knot.dim),), units[knot.var])
        values = dimension_values(self.spec.space, x).float()
        score = self._problem.bits_per_byte(values)
        self.optimizer.step()
        seconds = time.perf_counter() - started
        self.steps += 1
        self.elapsed += seconds
        if score < self.best_score:
            self.best_point, self.best_score = point, score
        return point, Evaluation(self.spec.space.key(point), score, None, seconds, worker_name())

    def best(self) -> tuple[list[float], Evaluation]:
        """The best point so far, scored by the Evaluator on data and test (as every optimizer's
        candidates are); the start point before any step."""
        point = self.best_point if self.best_point is not None else list(self.start)
        return point, self.evaluator(self.spec.space.recipe_for(point))

    def done(self) -> bool:
        """Whether the budget (evaluations, or wall time) is spent."""
        settings = self.spec.settings
        if settings.evaluations is not None and self.steps >= settings.evaluations:
            return True
        return settings.wall_time_s is not None and self.elapsed >= settings.wall_time_s

    def state_dict(self) -> dict[str, Any]:
        """Picklable state: the free variables, Adam's moments, steps, time and the best point."""
        return {"z": self.z.detach().tolist(), "adam": self.optimizer.state_dict(), "steps": self.steps,
                "elapsed": self.elapsed, "best_point": self.best_point, "best_score": self.best_score}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`'s state: the next step is the one it would have taken."""
        with torch.no_grad():
            self.z.copy_(torch.tensor(state["z"], dtype=torch.float64))
        self.optimizer.load_state_dict(state["adam"])
        self.steps, self.elapsed = int(state["steps"]), float(state["elapsed"])
        self.best_point, self.best_score = state["best_point"], float(state["best_score"])
