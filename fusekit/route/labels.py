"""Labels: which model is best for each example, from the data or from the models themselves.

``loss`` and ``pairwise`` labels come from :func:`score_matrix`: every model scores every example in
bits per byte with :func:`fusekit.lm.score.score_texts` (the measure ``fusekit score`` reports). For
``prompt`` + ``completion`` rows the completion is scored after the prompt, as the difference between
the log-likelihood of prompt + completion and that of the prompt alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fusekit.errors import FusekitError
from fusekit.progress import label
from fusekit.route.data import Example, RouteDataError

if TYPE_CHECKING:
    from fusekit.lm.load import LoadedLM

log = logging.getLogger("fusekit")


class LabelError(FusekitError, ValueError):
    """Labels cannot be made or cannot train a router."""


@dataclass(frozen=True)
class Scores:
    """Each model's negative log-likelihood of each example.

    Attributes:
        nll_bits: ``(n_examples, n_models)`` float64 bits.
        n_bytes: ``(n_examples,)`` UTF-8 bytes of each scored text.
    """

    nll_bits: torch.Tensor
    n_bytes: torch.Tensor

    @property
    def bits_per_byte(self) -> torch.Tensor:
        """``(n_examples, n_models)`` per-example bits per byte."""
        return self.nll_bits / self.n_bytes[:, None]

    def pooled(self, chosen: torch.Tensor) -> float:
        """Bits per byte over all examples (total bits / total bytes) when example i uses model
        ``chosen[i]``."""
        bits = self.nll_bits.gather(1, chosen.long()[:, None]).squeeze(1)
        return float(bits.sum() / self.n_bytes.sum())


def score_column(ref: str, examples: Sequence[Example], *, device: str = "cpu", batch_size: int = 8,
                 context: int | None = None, use_cache: bool = True, desc: str | None = None,
                 load: Callable[[], LoadedLM] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One model's ``(nll_bits, n_bytes)`` over ``examples`` (both ``(n,)`` float64).

    Scores come from the score cache where this model has scored the same text with the same
    settings before (:mod:`fusekit.lm.score_cache`; ``use_cache=False`` scores everything afresh);
    ``load``, when given, returns the model already loaded (called only if something must be scored).
    """
    from fusekit.lm.score_cache import score_texts_cached

    texts = scored_texts(examples)
    scores = score_texts_cached(ref, texts, device=device, context=context, batch_size=batch_size,
                                use_cache=use_cache, desc=desc, load=load)
    return column_from_scores(examples, [s.nll_nats for s in scores])


class SharedMembers:
    """Loads the adapters among ``refs`` together, on first need, with
    :func:`fusekit.lm.library.load_members` (adapters over one base share it); full models are left
    to the caller (loaded one at a time).

    Args:
        refs: model references.
        device: where the models run.
    """

    def __init__(self, refs: Sequence[str], *, device: str) -> None:
        from fusekit.io.refs import resolve_model

        self.refs = list(refs)
        self.device = device
        adapters = [i for i, ref in enumerate(refs) if resolve_model(ref).adapter is not None]
        self.adapters = adapters if len(adapters) >= 2 else []
        self._loaded: dict[int, LoadedLM] = {}

    def loader(self, index: int) -> Callable[[], LoadedLM] | None:
        """A function returning model ``index`` loaded beside the other adapters, or None (a full
        model, or the only adapter)."""
        if index not in self.adapters:
            return None
        return lambda: self.get(index)

    def get(self, index: int) -> LoadedLM:
        """Model ``index``, loading every adapter of ``refs`` at the first call."""
        if not self._loaded:
            from fusekit.lm.library import load_members

            members = load_members([self.refs[i] for i in self.adapters], device=self.device)
            self._loaded = dict(zip(self.adapters, members, strict=True))
        return self._loaded[index]


def scored_texts(examples: Sequence[Example]) -> list[str]:
    """The texts a model scores for ``examples``: each example's full text (prompt + completion, or
    the text), then the prompt alone of each example that has a completion."""
    full = [e.query + e.completion if e.completion is not None else e.query for e in examples]
    return full + [e.query for e in examples if e.completion is not None]


def column_from_scores(examples: Sequence[Example],
                       nll_nats: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll_bits, n_bytes)`` of ``examples`` from the NLL in nats of :func:`scored_texts`' texts:
    a completion is scored as the full text's NLL less the prompt's."""
    prompts = [i for i, e in enumerate(examples) if e.completion is not None]
    nll = torch.tensor(nll_nats[:len(examples)], dtype=torch.float64)
    if prompts:
        nll[prompts] -= torch.tensor(nll_nats[len(examples):], dtype=torch.float64)
    n_bytes = torch.tensor([len(e.scored_text.encode("utf-8")) for e in examples], dtype=torch.float64)
    return nll / math.log(2), n_bytes


def score_matrix(refs: Sequence[str], examples: Sequence[Example], *, device: str = "cpu",
                 batch_size: int = 8, context: int | None = None, use_cache: bool = True) -> Scores:
    """Every model's score on every example: LoRA adapters loaded together on one shared base, other
    models one at a time; none loaded for cached scores."""
    columns = []
    n_bytes = torch.zeros(len(examples), dtype=torch.float64)
    shared = SharedMembers(refs, device=device)
    for index, ref in enumerate(refs):
        log.info("scoring %d examples with %s", len(examples), ref)
        desc = (f"scoring {len(examples)} examples x {len(refs)} models: {label(ref)} "
                f"({index + 1}/{len(refs)})")
        nll, n_bytes = score_column(ref, examples, device=device, batch_size=batch_size, context=context,
                                    use_cache=use_cache, desc=desc, load=shared.loader(index))
        columns.append(nll)
    return Scores(torch.stack(columns, dim=1), n_bytes)


def loss_labels(scores: Scores, order: Sequence[int]) -> torch.Tensor:
    """``(n,)`` the model with the lowest bits per byte; ties go to the cheaper model."""
    rank = torch.empty(len(order), dtype=torch.float64)
    rank[list(order)] = torch.arange(len(order), dtype=torch.float64)
    bpb = scores.bits_per_byte
    best = bpb.min(1, keepdim=True).values
    tied = bpb <= best
    return torch.where(tied, rank[None, :], math.inf).argmin(1)


def pairwise_labels(scores: Scores, margin: float) -> torch.Tensor:
    """``(n,)`` 1 where the second model's bits per byte are below ``(1 - margin)`` × the first's."""
    bpb = scores.bits_per_byte
    return (bpb[:, 1] < bpb[:, 0] * (1 - margin)).long()


def given_labels(examples: Sequence[Example], names: Sequence[str], data: str) -> torch.Tensor:
    """``(n,)`` indices of the models the data's ``label`` fields name."""
    index = {name: i for i, name in enumerate(names)}
    out = []
    for example in examples:
        if example.label is None:
            raise RouteDataError(f"{data}:{example.line}: labels: given needs a 'label' on every line; "
                                 "add one, or use labels: loss to label by scoring")
        if example.label not in index:
            raise RouteDataError(f"{data}:{example.line}: label '{example.label}' is not one of the "
                                 f"router's models ({', '.join(names)})")
        out.append(index[example.label])
    return torch.tensor(out, dtype=torch.long)


def require_two_classes(labels: torch.Tensor, names: Sequence[str], how: str) -> None:
    """Refuse training labels that all name one model: there is no choice to learn."""
    if len(names) > 1 and labels.numel() and bool((labels == labels[0]).all()):
        raise LabelError(f"all {labels.numel()} training labels ({how}) name '{names[int(labels[0])]}', "
                         "so there is no choice for a router to learn from; add examples where another "
                         "model is best, or use that model without a router")
