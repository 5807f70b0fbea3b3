"""``fusekit route run``: route one prompt and, if asked, let the chosen model answer it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from fusekit.route.router import Decision, load_router


@dataclass(frozen=True)
class RunResult:
    """The routing decision and, with ``generate``, the chosen model's continuation."""

    decision: Decision
    answer: str | None
    seconds_routing: float


def generate_answer(ref: str, prompt: str, *, max_new_tokens: int = 64, device: str = "cpu") -> str:
    """Greedy continuation of ``prompt`` by the model at ``ref``, new text only: the same loader and
    decoder as ``fusekit ensemble generate`` (prompt read as ``fusekit score`` reads text)."""
    from fusekit.lm import load_lm
    from fusekit.lm.generate import generate

    lm = load_lm(ref, device=device)
    return generate(lm, [prompt], max_new_tokens=max_new_tokens)[0]


def run_router(router_dir: str | Path, prompt: str, *, generate: bool = False, max_new_tokens: int = 64,
               threshold: float | None = None, device: str = "cpu") -> RunResult:
    """Route ``prompt`` with the router in ``router_dir``; with ``generate`` the chosen model answers."""
    import time

    router = load_router(router_dir, device=device)
    router.probabilities([prompt])  # builds the lookup tables once, so the timing below is one decision
    start = time.perf_counter()
    decision = router.route(prompt, threshold=threshold)
    seconds = time.perf_counter() - start
    answer = None
    if generate:
        answer = generate_answer(decision.model.reference(), prompt, max_new_tokens=max_new_tokens,
                                 device=device)
    return RunResult(decision, answer, seconds)
