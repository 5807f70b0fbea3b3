"""``fusekit route run``: route one prompt, or every query of a file, and, if asked, let the chosen
models answer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusekit.route.data import load_examples
from fusekit.route.policy import choose
from fusekit.route.router import Decision, is_arrow_router, load_router


@dataclass(frozen=True)
class RunResult:
    """The routing decision and, with ``generate``, the chosen model's continuation."""

    decision: Decision
    answer: str | None
    seconds_routing: float


def generate_answers(ref: str, prompts: Sequence[str], *, max_new_tokens: int = 64,
                     device: str = "cpu") -> list[str]:
    """Greedy continuations of ``prompts`` by the model at ``ref``, new text only: the same loader and
    decoder as ``fusekit ensemble generate`` (prompts read as ``fusekit score`` reads text)."""
    import gc

    from fusekit.lm import load_lm
    from fusekit.lm.generate import generate

    lm = load_lm(ref, device=device)
    try:
        return generate(lm, prompts, max_new_tokens=max_new_tokens)
    finally:
        del lm
        gc.collect()


def run_router(router_dir: str | Path, prompt: str, *, generate: bool = False, max_new_tokens: int = 64,
               threshold: float | None = None, device: str = "cpu") -> RunResult:
    """Route one prompt with a built router; optionally let the chosen model answer.

    Args:
        router_dir: a folder written by ``fusekit route build``.
        prompt: the query.
        generate: let the chosen model continue the prompt (greedy).
        max_new_tokens: most tokens the answer adds.
        threshold: overrides the router's cost-quality threshold.
        device: where the answering model runs.

    Returns:
        A :class:`RunResult`: the chosen model, every model's probability, the decision time and,
        with ``generate``, the answer.

    Raises:
        RouterFolderError: ``router_dir`` is not a router folder or its files were changed.

    Example:
        >>> run_router("./router", "def fib(n):").model  # doctest: +SKIP
    """
    import time

    if is_arrow_router(router_dir):
        return _run_arrow(router_dir, prompt, generate=generate, max_new_tokens=max_new_tokens, device=device)
    router = load_router(router_dir, device=device)
    router.probabilities([prompt])  # builds the lookup tables once, so the timing below is one decision
    start = time.perf_counter()
    decision = router.route(prompt, threshold=threshold)
    seconds = time.perf_counter() - start
    answer = None
    if generate:
        answer = generate_answers(decision.model.reference(), [prompt], max_new_tokens=max_new_tokens,
                                  device=device)[0]
    return RunResult(decision, answer, seconds)


def route_file(router_dir: str | Path, data: str | Path, *, generate: bool = False, max_new_tokens: int = 64,
               threshold: float | None = None, device: str = "cpu") -> list[dict[str, Any]]:
    """Route every query of a JSONL file (``text`` or ``prompt``); one record per query, in order:
    its ``line``, the chosen ``model`` and every model's ``probabilities`` and, with ``generate``,
    the chosen model's ``answer`` (adapters over one base share one loaded base, and each model is
    loaded once, for all the queries routed to it). For an Arrow router ``model`` is the adapter with
    the largest mean weight, ``probabilities`` the mean weights, and the Arrow model answers."""
    if is_arrow_router(router_dir):
        return _arrow_file(router_dir, data, generate=generate, max_new_tokens=max_new_tokens, device=device)
    router = load_router(router_dir, device=device)
    examples = load_examples(data, queries_only=True)
    queries = [e.query for e in examples]
    q = router.probabilities(queries)
    chosen = choose(q, router.order, router.threshold if threshold is None else threshold).tolist()
    records: list[dict[str, Any]] = [
        {"line": e.line, "model": router.names[m], "probabilities": dict(zip(router.names, row, strict=True))}
        for e, m, row in zip(examples, chosen, q.tolist(), strict=True)]
    if generate:
        _answer_chosen([m.reference() for m in router.models], queries, chosen, records,
                       max_new_tokens=max_new_tokens, device=device)
    return records


def _answer_chosen(refs: Sequence[str], queries: Sequence[str], chosen: Sequence[int],
                   records: list[dict[str, Any]], *, max_new_tokens: int, device: str) -> None:
    """Set each record's ``answer``: the continuation of its query by the model it was routed to.

    Only the chosen models are loaded: LoRA adapters together, on one shared base
    (:class:`fusekit.route.labels.SharedMembers`), full models one at a time; each model answers all
    of its queries in one batch."""
    import gc

    from fusekit.lm.generate import generate
    from fusekit.route.labels import SharedMembers

    used = sorted(set(chosen))
    shared = SharedMembers([refs[i] for i in used], device=device)
    for position, index in enumerate(used):
        mine = [i for i, m in enumerate(chosen) if m == index]
        load = shared.loader(position)
        if load is not None:
            answers = generate(load(), [queries[i] for i in mine], max_new_tokens=max_new_tokens)
        else:
            answers = generate_answers(refs[index], [queries[i] for i in mine], max_new_tokens=max_new_tokens,
                                       device=device)
        for i, answer in zip(mine, answers, strict=True):
            records[i]["answer"] = answer
    del shared
    gc.collect()


def _run_arrow(router_dir: str | Path, prompt: str, *, generate: bool, max_new_tokens: int,
               device: str) -> RunResult:
    """:func:`run_router` for an Arrow router: the adapter with the largest mean weight over the
    prompt's tokens and layers is the "chosen" one; with ``generate`` the Arrow model answers."""
    import time

    from fusekit.lm.generate import generate as continue_prompts
    from fusekit.route.arrow import load_arrow, load_arrow_lm, routing_weights

    arrow = load_arrow(router_dir)
    lm = load_arrow_lm(arrow, device=device)
    start = time.perf_counter()
    weights = routing_weights(lm, [prompt])[0]
    seconds = time.perf_counter() - start
    index = int(weights.argmax())
    probabilities = dict(zip(arrow.names, weights.tolist(), strict=True))
    decision = Decision(arrow.models[index], index, probabilities, None)
    answer = continue_prompts(lm, [prompt], max_new_tokens=max_new_tokens)[0] if generate else None
    return RunResult(decision, answer, seconds)


def _arrow_file(router_dir: str | Path, data: str | Path, *, generate: bool, max_new_tokens: int,
                device: str) -> list[dict[str, Any]]:
    """:func:`route_file` for an Arrow router (one Arrow model answers every query)."""
    from fusekit.lm.generate import generate as continue_prompts
    from fusekit.route.arrow import load_arrow, load_arrow_lm, routing_weights

    arrow = load_arrow(router_dir)
    examples = load_examples(data, queries_only=True)
    queries = [e.query for e in examples]
    lm = load_arrow_lm(arrow, device=device)
    weights = routing_weights(lm, queries)
    records: list[dict[str, Any]] = [
        {"line": e.line, "model": arrow.names[int(row.argmax())],
         "probabilities": dict(zip(arrow.names, row.tolist(), strict=True))}
        for e, row in zip(examples, weights, strict=True)]
    if generate:
        for record, answer in zip(records, continue_prompts(lm, queries, max_new_tokens=max_new_tokens),
                                  strict=True):
            record["answer"] = answer
    return records
