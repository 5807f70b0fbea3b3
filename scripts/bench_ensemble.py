"""Tokens per second of each ensemble member alone and of the ensemble, in the same run.

    python scripts/bench_ensemble.py [--experts demo-out/experts] [--tokens 128] [--repeats 7]
                                     [--threads 1] [--clock cpu|wall] [--json]

Each member alone decodes greedily with its KV cache in a plain loop (one forward per token on the
same prompt, batch 1, same dtype and thread count, no ensemble code). The ensemble decodes the same
number of tokens (end-of-sequence ignored). The overhead is the ensemble's time over the sum of its
members' times: 1.0 means combining costs nothing beyond running every member. Goals: <= 1.15 for
one vocabulary, <= 1.5 for different ones.

Also reported: ``lockstep``, the members' plain loops run one token at a time in turn (what an
ensemble must do at least: every member's forward per token, but no combining). Its excess over
the sum of members is what the hardware charges for switching between several models' weights
every token (caches), not ensemble code; ``overhead_vs_lockstep`` is the ensemble code's own cost.

The ``byte1`` .. ``byte8`` rows (``method: byte`` at beam 1, 2, 4, 8) decode ``--tokens`` bytes, so
their ``ensemble_tokens_per_second`` is bytes per second (members alone stay in tokens per second).

Runs are interleaved (members, lockstep, ensemble, then again) and the best of ``--repeats`` is
kept for each, since shared machines are noisy. ``--clock cpu`` (default) times the process's CPU
seconds, which other programs on a busy machine disturb far less than wall-clock time.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from fusekit.ensemble.engine import Ensemble, load_members
from fusekit.ensemble.members import Member
from fusekit.ensemble.recipe import parse_ensemble_recipe
from fusekit.lm.decode import cache_kwargs

PROMPT = "def parse_args(argv):\n    \"\"\"Parse the command line"
CLOCKS: dict[str, Callable[[], float]] = {"cpu": time.process_time, "wall": time.perf_counter}


def _start(member: Member, prompt: str) -> list[Any]:
    ids = [member.vocab.start_id, *member.tokenizer(prompt, add_special_tokens=False)["input_ids"]]
    return [member.lm.model, None, torch.tensor([ids], device=member.lm.device), 0]


def lockstep(members: Sequence[Member], prompt: str, tokens: int, clock: Callable[[], float]) -> float:
    """Seconds for plain greedy KV-cached loops of ``tokens`` steps, one member after another per
    token (a single member: that member alone)."""
    states = [_start(m, prompt) for m in members]
    started = clock()
    with torch.inference_mode():
        for _ in range(tokens):
            for state in states:
                model, cache, step, position = state
                positions = torch.arange(position, position + step.shape[1], device=step.device)[None]
                out = model(input_ids=step, position_ids=positions, use_cache=True,
                            **cache_kwargs(model, cache))
                state[1], state[3] = out.past_key_values, position + step.shape[1]
                state[2] = out.logits[:, -1].argmax(-1, keepdim=True)
    return clock() - started


def ensemble_time(ens: Ensemble, prompt: str, tokens: int, clock: Callable[[], float]) -> tuple[float, int]:
    started = clock()
    result = ens.generate([prompt], max_new_tokens=tokens)
    return clock() - started, result.new_tokens


def bench(name: str, text: str, tokens: int, repeats: int, device: str, clock: str) -> dict[str, object]:
    recipe, _ = parse_ensemble_recipe(text, name)
    members = load_members(recipe, device=device)
    ens = Ensemble(recipe, members)
    tick = CLOCKS[clock]
    lockstep(members, PROMPT, 4, tick)  # warm-up
    ens.generate([PROMPT], max_new_tokens=4)
    alone: list[list[float]] = [[] for _ in members]
    locked: list[float] = []
    runs: list[float] = []
    produced = 0
    for _ in range(repeats):
        for i, m in enumerate(members):
            alone[i].append(lockstep([m], PROMPT, tokens, tick))
        locked.append(lockstep(members, PROMPT, tokens, tick))
        seconds, produced = ensemble_time(ens, PROMPT, tokens, tick)
        runs.append(seconds)
    best = [min(a) for a in alone]
    seconds = min(runs)
    return {"ensemble": name, "method": recipe.method, "tokens": produced, "clock": clock,
            "members": {m.ref: round(tokens / t, 1) for m, t in zip(members, best, strict=True)},
            "member_seconds": [round(t, 4) for t in best], "lockstep_seconds": round(min(locked), 4),
            "ensemble_seconds": round(seconds, 4), "ensemble_tokens_per_second": round(produced / seconds, 1),
            "overhead": round(seconds / sum(best), 3),
            "lockstep_overhead": round(min(locked) / sum(best), 3),
            "overhead_vs_lockstep": round(seconds / min(locked), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--experts", type=Path, default=Path("demo-out/experts"))
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="cpu")
    parser.add_argument("--only", action="append",
                        choices=["prob_avg", "union", "relative", "byte1", "byte2", "byte4", "byte8"],
                        help="run only these cases (repeatable)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    e = args.experts
    if not (e / "python").is_dir():
        sys.exit(f"bench_ensemble: no demo experts in {e}; run python scripts/make_demo_experts.py {e}")
    no_stop = "generation: {stop_at_eos: false}\n"
    cases = {
        "prob_avg": ("same vocabulary: prob_avg python+c+prose",
                     f"models:\n  - model: {e}/python\n  - model: {e}/c\n  - model: {e}/prose\n"
                     f"method: prob_avg\n{no_stop}"),
        "union": ("different vocabularies: union python+prose-b",
                  f"models:\n  - model: {e}/python\n  - model: {e}/prose-b\nmethod: union\n{no_stop}"),
        "relative": ("different vocabularies: relative python+prose-b",
                     f"models:\n  - model: {e}/python\n  - model: {e}/prose-b\nmethod: relative\n{no_stop}"),
    }
    for beam in (1, 2, 4, 8):
        cases[f"byte{beam}"] = (f"different vocabularies: byte (beam {beam}) python+prose-b, bytes",
                                f"models:\n  - model: {e}/python\n  - model: {e}/prose-b\nmethod: byte\n"
                                f"parameters: {{beam: {beam}}}\n{no_stop}")
    chosen = args.only or list(cases)
    rows = [bench(*cases[c], args.tokens, args.repeats, args.device, args.clock) for c in chosen]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    for row in rows:
        members = ", ".join(f"{Path(str(k)).name} {v} tok/s" for k, v in row["members"].items())  # type: ignore[attr-defined]
        print(f"{row['ensemble']}: {row['ensemble_tokens_per_second']} tok/s ({members}); "
              f"overhead {row['overhead']} x the sum of members (lockstep {row['lockstep_overhead']}, "
              f"ensemble / lockstep {row['overhead_vs_lockstep']}) [{row['clock']} time]")


if __name__ == "__main__":
    main()
