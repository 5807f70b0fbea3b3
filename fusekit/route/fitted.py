"""Fitted routers: learn, from feature rows and the index of each row's best model, a probability over
models for a new query. All in torch; a :class:`FittedRouter` is a small set of tensors plus its
settings, the learned part of a :class:`fusekit.route.router.Router` (which adds the featurizer, the
models, their cost order and the threshold).

* ``knn``: for each model, the mean cosine similarity between the query and the ``k`` most similar
  training queries that model won; a softmax at ``temperature`` turns those into probabilities.
  Models that never won get probability zero.
* ``logistic``: multinomial logistic regression, ``softmax(x W + b)``, L2-penalised.
* ``mlp``: one GELU hidden layer with dropout.
* ``mf``: matrix factorisation as in RouteLLM, generalised to N models:
  ``logit_m(x) = w · (v_m ⊙ (x P)) + b_m`` with a query projection ``P`` and a vector ``v_m`` per model.

The trained routers are fitted full-batch with AdamW for ``epochs`` steps from a seeded start, so the
same data and seed give the same router.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fusekit.route.recipe import KnnRouter, RouterSpec


@dataclass
class FittedRouter:
    """A trained router: ``kind``, its settings and its tensors (all CPU float32 / int64)."""

    kind: str
    n_models: int
    settings: dict[str, Any]
    params: dict[str, Tensor] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def probabilities(self, x: Tensor) -> Tensor:
        """``(n, dim)`` feature rows → ``(n, n_models)`` probabilities (rows sum to 1). ``knn`` also
        takes sparse COO rows of unit length.

        Models that won no training example get probability 0.
        """
        if self.n_models == 1:
            return torch.ones(x.shape[0], 1)
        q = _PREDICT[self.kind](self, x.float())
        seen = self.settings.get("seen")
        if seen is not None and len(seen) < self.n_models:
            mask = torch.zeros(self.n_models, dtype=torch.bool)
            mask[list(seen)] = True
            q = torch.where(mask, q, 0.0)
            q = q / q.sum(1, keepdim=True)
        return q


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run tiny tensor work (training a router, routing one query) on one thread: on a busy machine,
    waking more threads for tiny tensors costs far more than the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class _KnnIndex:
    """The training rows as columns ``(dim, n_models * width)``: model m's wins fill block m, padded
    with zero columns whose ``bias`` is ``-inf`` so they never reach a top k."""

    columns: Tensor
    bias: Tensor
    width: int
    counts: list[int]


def _knn_index(router: FittedRouter) -> _KnnIndex:
    """Built once per loaded router."""
    cached = router.cache.get("knn")
    if cached is None:
        memory, labels = router.params["memory"], router.params["labels"]
        counts = torch.bincount(labels, minlength=router.n_models).tolist()
        width = max(counts)
        columns = torch.zeros(memory.shape[1], router.n_models * width)
        bias = torch.full((router.n_models * width,), float("-inf"))
        for model, count in enumerate(counts):
            columns[:, model * width:model * width + count] = memory[labels == model].T
            bias[model * width:model * width + count] = 0.0
        cached = _KnnIndex(columns, bias, width, counts)
        router.cache["knn"] = cached
    return cached


def _sparse_times(x: Tensor, matrix: Tensor) -> Tensor:
    """Sparse COO rows ``(n, dim)`` times a dense ``(dim, m)`` matrix, as per-row weighted sums of
    the matrix's rows (``embedding_bag``): for a query's few hundred n-grams this takes about two
    thirds of the time of ``torch.sparse.mm``."""
    x = x.coalesce()
    rows, columns = x.indices()
    offsets = torch.searchsorted(rows, torch.arange(x.shape[0]))
    return nn.functional.embedding_bag(columns, matrix, offsets, mode="sum", per_sample_weights=x.values())


def _knn_predict(router: FittedRouter, x: Tensor) -> Tensor:
    index = _knn_index(router)
    k, temperature = int(router.settings["k"]), float(router.settings["temperature"])
    if x.is_sparse:  # unit-length sparse rows (Tfidf.sparse_rows): only the query's n-grams count
        sims = _sparse_times(x, index.columns)
    else:
        x = nn.functional.normalize(x, dim=1)
        sims = _sparse_times(x.to_sparse(), index.columns) if 4 * int(x.count_nonzero()) < x.numel() \
            else x @ index.columns
    sims = (sims + index.bias).view(x.shape[0], router.n_models, index.width)
    if min(index.counts) >= k:
        scores = sims.topk(k, dim=2).values.mean(2)
    else:  # a model won fewer than k examples: average over those it has (none: -inf)
        scores = torch.stack([sims[:, m, :count].topk(min(k, count), dim=1).values.mean(1) if count
                              else torch.full((x.shape[0],), float("-inf"))
                              for m, count in enumerate(index.counts)], dim=1)
    return torch.softmax(scores / temperature, dim=1)


def _logistic_module(dim: int, n_models: int, settings: dict[str, Any]) -> nn.Module:
    return nn.Linear(dim, n_models)


def _mlp_module(dim: int, n_models: int, settings: dict[str, Any]) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, settings["hidden"]), nn.GELU(), nn.Dropout(settings["dropout"]),
                         nn.Linear(settings["hidden"], n_models))


class _MatrixFactorisation(nn.Module):
    """``logit_m(x) = w · (v_m ⊙ (x P)) + b_m``."""

    def __init__(self, dim: int, n_models: int, settings: dict[str, Any]) -> None:
        super().__init__()
        rank = settings["dim"]
        self.proj = nn.Linear(dim, rank, bias=False)  # P: (rank, dim)
        self.models = nn.Parameter(torch.randn(n_models, rank) / rank**0.5)  # v: (n_models, rank)
        self.out = nn.Parameter(torch.randn(rank) / rank**0.5)  # w: (rank,)
        self.bias = nn.Parameter(torch.zeros(n_models))

    def forward(self, x: Tensor) -> Tensor:
        query = self.proj(x)  # (n, rank)
        return (query[:, None, :] * self.models[None] * self.out).sum(-1) + self.bias  # (n, n_models)


_MODULES: dict[str, Callable[[int, int, dict[str, Any]], nn.Module]] = {
    "logistic": _logistic_module, "mlp": _mlp_module, "mf": _MatrixFactorisation,
}


def _module_predict(router: FittedRouter, x: Tensor) -> Tensor:
    module = _MODULES[router.kind](int(router.settings["input_dim"]), router.n_models, router.settings)
    module.load_state_dict(router.params)
    module.eval()
    with torch.inference_mode():
        return torch.softmax(module(x), dim=1)


_PREDICT: dict[str, Callable[[FittedRouter, Tensor], Tensor]] = {
    "knn": _knn_predict, "logistic": _module_predict, "mlp": _module_predict, "mf": _module_predict,
}


def fit_router(spec: RouterSpec, x: Tensor, y: Tensor, n_models: int, *, seed: int = 0) -> FittedRouter:
    """Train the router ``spec`` on feature rows ``x`` ``(n, dim)`` and best-model indices ``y`` ``(n,)``.

    A router over one model, or trained on labels that all name the same model, learns to send every
    query to that model.
    """
    settings = spec.model_dump(exclude={"type"})
    settings["input_dim"] = int(x.shape[1])
    y = y.long()
    settings["seen"] = sorted(set(y.tolist()))
    if n_models == 1:
        return FittedRouter(spec.type, 1, settings)
    if isinstance(spec, KnnRouter):
        memory = nn.functional.normalize(x.float(), dim=1).contiguous()
        return FittedRouter("knn", n_models, settings, {"memory": memory, "labels": y.clone()})
    with torch.random.fork_rng(devices=[]), one_thread():
        torch.manual_seed(seed)
        module = _MODULES[spec.type](int(x.shape[1]), n_models, settings)
        optimiser = torch.optim.AdamW(module.parameters(), lr=spec.lr, weight_decay=spec.weight_decay)
        module.train()
        for _ in range(spec.epochs):
            optimiser.zero_grad()
            loss = nn.functional.cross_entropy(module(x.float()), y)
            loss.backward()
            optimiser.step()
    module.eval()
    params = {name: value.detach().clone().contiguous() for name, value in module.state_dict().items()}
    return FittedRouter(spec.type, n_models, settings, params)
