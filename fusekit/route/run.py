"""``fusekit route run``: route one prompt and, if asked, let the chosen model answer it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusekit.route.router import Decision, load_router


@dataclass(frozen=True)
class RunResult:
    """The routing decision and, with ``generate``, the chosen model's continuation."""

    decision: Decision
    answer: str | None
    seconds_routing: float


def generate_answer(ref: str, prompt: str, *, max_new_tokens: int = 64, device: str = "cpu") -> str:
    """Greedy continuation of ``prompt`` by the model at ``ref`` (loaded with ``load_lm``), new text only."""
    from fusekit.lm import load_lm

    lm = load_lm(ref, device=device)
    assert lm.tokenizer is not None
    ids = lm.tokenizer(prompt, return_tensors="pt")["input_ids"].to(lm.device)
    pad = lm.tokenizer.pad_token_id if lm.tokenizer.pad_token_id is not None else lm.tokenizer.eos_token_id
    with torch.inference_mode():
        generate: Any = lm.model.generate
        out = generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                       max_new_tokens=max_new_tokens, pad_token_id=pad)
    return str(lm.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))


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
