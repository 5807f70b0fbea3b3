"""``fusekit select``: choose k of N experts for a data set, greedily or by clustering their ΔW.

Example:
    >>> options = SelectOptions(k=2, method="greedy")
    >>> sel = select_experts(["lora/python", "lora/c", "lora/prose"], texts, options)  # doctest: +SKIP
    >>> print("\\n".join(sel.text_lines()))  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fusekit.select.cluster import average_linkage, cosine_matrix, delta_gram, representative
from fusekit.select.greedy import Step, check_k, greedy_select
from fusekit.select.mixture import check_same_tokenizer, member_token_logprobs, mixture_bpb
from fusekit.select.recipes import merge_uniform, merged_bpb

OBJECTIVES = {"ensemble": "bits per byte of the uniform prob_avg ensemble",
              "merge": "bits per byte of the uniform linear merge (slow: one merge per candidate)"}


@dataclass(frozen=True)
class SelectOptions:
    """How to select.

    Attributes:
        k: how many experts to keep (``1 … N``).
        method: ``greedy`` forward selection or ``cluster`` (average linkage on ``1 - cos ΔW``).
        objective: what a subset is scored by: its uniform ``ensemble`` or its uniform linear ``merge``.
        base: the base every expert is an update of (clustering; merges of adapters).
        merge_clusters: with ``cluster``, merge each cluster into one expert (written to ``experts_dir``).
        experts_dir: where merged clusters go.
        device / dtype / use_cache / batch_size: how members are scored.
    """

    k: int
    method: Literal["greedy", "cluster"] = "greedy"
    objective: Literal["ensemble", "merge"] = "ensemble"
    base: str | None = None
    merge_clusters: bool = False
    experts_dir: Path | None = None
    device: str = "cpu"
    dtype: str | None = "float32"
    use_cache: bool = True
    batch_size: int = 8


@dataclass
class Selection:
    """What :func:`select_experts` chose.

    Attributes:
        experts: the candidates, as given.
        options: how they were selected.
        chosen: indices of the chosen experts (greedy: in the order added; cluster: representatives).
        members: the references a recipe uses (the chosen experts, or merged cluster folders).
        score: the objective of ``members``.
        steps: greedy's steps.
        clusters: the clusters (expert indices).
    """

    experts: list[str]
    options: SelectOptions
    chosen: list[int]
    members: list[str]
    score: float
    steps: list[Step] = field(default_factory=list)
    clusters: list[list[int]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready report."""
        o = self.options
        return {"method": o.method, "objective": o.objective, "k": o.k, "experts": self.experts,
                "chosen": [self.experts[i] for i in self.chosen], "members": self.members,
                "bits_per_byte": self.score,
                "steps": [{"added": self.experts[s.added], "bits_per_byte": s.score,
                           "tried": {self.experts[i]: v for i, v in s.tried.items()}} for s in self.steps],
                "clusters": [[self.experts[i] for i in c] for c in self.clusters]}

    def text_lines(self) -> list[str]:
        """The report as lines of text."""
        o = self.options
        lines = [f"{o.method} selection of {o.k} of {len(self.experts)} experts; "
                 f"score: {OBJECTIVES[o.objective]}"]
        width = max(len(e) for e in self.experts)
        for n, s in enumerate(self.steps, start=1):
            lines.append(f"step {n}: add {self.experts[s.added]:<{width}}  {s.score:.4f} bits/byte")
        if self.clusters:
            for n, (c, member) in enumerate(zip(self.clusters, self.members, strict=True), start=1):
                names = ", ".join(self.experts[i] for i in c)
                lines.append(f"cluster {n}: {names} -> {member}")
        lines.append(f"chosen: {', '.join(self.members)}  ({self.score:.4f} bits/byte)")
        return lines


def select_experts(experts: Sequence[str], texts: Sequence[str], options: SelectOptions) -> Selection:
    """Choose ``options.k`` of ``experts`` for ``texts``.

    Args:
        experts: candidate models (adapters, ``base+adapter``, full fine-tunes).
        texts: the data the objective is measured on.
        options: method, objective, k and scoring settings.

    Returns:
        The :class:`Selection`.

    Raises:
        FusekitError: k outside ``1 … N``, a repeated expert, experts with different tokenizers (for
            the ensemble objective), experts over different bases (clustering), unloadable models.
    """
    experts = list(experts)
    check_k(options.k, len(experts))
    repeated = next((e for n, e in enumerate(experts) if e in experts[:n]), None)
    if repeated is not None:
        from fusekit.errors import FusekitError

        raise FusekitError(f"expert '{repeated}' is named twice; name each expert once")
    if options.objective == "ensemble":
        check_same_tokenizer(experts)
    if options.method == "greedy":
        return _greedy(experts, texts, options)
    return _cluster(experts, texts, options)


def _greedy(experts: list[str], texts: Sequence[str], o: SelectOptions) -> Selection:
    if o.objective == "ensemble":
        lp = member_token_logprobs(experts, texts, device=o.device, dtype=o.dtype, use_cache=o.use_cache,
                                   batch_size=o.batch_size)
        steps = greedy_select(len(experts), o.k, lambda s: mixture_bpb(lp.subset(s), [1.0] * len(s)))
    else:
        steps = greedy_select(len(experts), o.k, lambda s: _score(o, [experts[i] for i in s], texts))
    chosen = list(steps[-1].subset)
    return Selection(experts, o, chosen, [experts[i] for i in chosen], steps[-1].score, steps=steps)


def _cluster(experts: list[str], texts: Sequence[str], o: SelectOptions) -> Selection:
    cos = cosine_matrix(delta_gram(experts, base=o.base))
    clusters = average_linkage(cos, o.k)
    chosen = [representative(cos, c) for c in clusters]
    members = [experts[i] for i in chosen]
    if o.merge_clusters:
        folder = o.experts_dir or Path("selected-experts")
        members = [experts[c[0]] if len(c) == 1 else
                   str(merge_uniform([experts[i] for i in c], folder / f"cluster-{n}", base=o.base,
                                     device=o.device))
                   for n, c in enumerate(clusters, start=1)]
    return Selection(experts, o, chosen, members, _score(o, members, texts), clusters=clusters)


def _score(o: SelectOptions, members: Sequence[str], texts: Sequence[str]) -> float:
    """The objective of ``members``: their uniform ensemble's or uniform merge's bits per byte."""
    if o.objective == "merge":
        return merged_bpb(members, texts, base=o.base, device=o.device, dtype=o.dtype,
                          batch_size=o.batch_size)
    lp = member_token_logprobs(members, texts, device=o.device, dtype=o.dtype, use_cache=o.use_cache,
                               batch_size=o.batch_size)
    return mixture_bpb(lp, [1.0] * len(members))
