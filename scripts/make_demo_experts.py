"""Train the demo experts (small Llama models on Python source, C headers and English prose).

Usage:
    python scripts/make_demo_experts.py OUT_DIR [--quick] [--seed N] [--overwrite] [--no-eval]

Writes OUT_DIR/{python,c,prose,prose-b}/ (the first three share tokenizer A, prose-b has its own
tokenizer B), OUT_DIR/heldout/{python,c,prose,mixed}.txt, OUT_DIR/data/{train,test}.jsonl and
OUT_DIR/experts.json, then prints each expert's bits per byte on each held-out text. The full build
takes a few CPU minutes; --quick trains tiny models for a few steps (seconds). Needs the 'lm' extra.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="output folder, e.g. demo-out/experts")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (for tests)")
    parser.add_argument("--seed", type=int, default=0, help="seed for initialisation and data order")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--no-eval", action="store_true", help="skip the bits-per-byte table")
    parser.add_argument("--device", default="cpu", help="where to run the evaluation: cpu, cuda, auto")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"make_demo_experts.py: {' and '.join(missing)} not installed; install fusekit with the "
              "'lm' extra: pip install 'fusekit[lm]'", file=sys.stderr)
        return 2
    from fusekit.demo import build_demo_experts, evaluate_experts
    from fusekit.errors import FusekitError

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        started = time.perf_counter()
        experts = build_demo_experts(args.out_dir, quick=args.quick, seed=args.seed,
                                     overwrite=args.overwrite, log=log)
        log(f"wrote {experts.root} in {time.perf_counter() - started:.0f} s")
        if args.no_eval:
            return 0
        table = evaluate_experts(experts, device=args.device)
    except FusekitError as exc:
        print(f"make_demo_experts.py: error: {exc}", file=sys.stderr)
        return 2
    names = list(experts.heldout)
    print("bits per byte on held-out text (lower is better)")
    print(f"{'expert':<10}" + "".join(f"{n:>9}" for n in names))
    for expert, row in table.items():
        print(f"{expert:<10}" + "".join(f"{row[n]:>9.3f}" for n in names))
    return 0


if __name__ == "__main__":
    sys.exit(main())
