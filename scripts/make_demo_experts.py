"""Train the demo experts (small Llama models on Python source, C headers and English prose).

Usage:
    python scripts/make_demo_experts.py OUT_DIR [--quick] [--seed N] [--overwrite] [--no-eval]
                                        [--lora [--lora-rank R]]

Writes OUT_DIR/{python,c,prose,prose-b}/ (the first three share tokenizer A, prose-b has its own
tokenizer B), OUT_DIR/heldout/{python,c,prose,mixed}.txt, OUT_DIR/data/{train,test}.jsonl and
OUT_DIR/experts.json, then prints each expert's bits per byte on each held-out text. The full build
takes a few CPU minutes; --quick trains tiny models for a few steps (seconds). Needs the 'lm' extra.

--lora also trains one PEFT LoRA adapter per domain over OUT_DIR/base into OUT_DIR/lora/{python,c,prose}
(needs the 'lora' extra); when OUT_DIR already holds experts they are kept and only the adapters are
trained (--overwrite then replaces OUT_DIR/lora). The table then compares, on each held-out text, the
base, each full fine-tune and each adapter applied to the base.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="output folder, e.g. demo-out/experts")
    parser.add_argument("--quick", action="store_true", help="tiny models, a few steps (for tests)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for initialisation and data order (default 0; with --lora over existing "
                             "experts, theirs)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    parser.add_argument("--no-eval", action="store_true", help="skip the bits-per-byte table")
    parser.add_argument("--device", default="cpu", help="where to run the evaluation: cpu, cuda, auto")
    parser.add_argument("--lora", action="store_true", help="also train a LoRA adapter per domain")
    parser.add_argument("--lora-rank", type=int, default=8, help="rank of the LoRA adapters")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    missing = [m for m in ("transformers", "tokenizers") if importlib.util.find_spec(m) is None]
    extra = "lm"
    if args.lora and importlib.util.find_spec("peft") is None:
        missing, extra = [*missing, "peft"], "lora"
    if missing:
        from fusekit.extras import install_hint

        print(f"make_demo_experts.py: {' and '.join(missing)} not installed; {install_hint(extra)}",
              file=sys.stderr)
        return 2
    from fusekit.errors import FusekitError
    from fusekit.progress import write as log  # lines above the training bar, not through it

    try:
        table, names = _build(args, log)
    except FusekitError as exc:
        print(f"make_demo_experts.py: error: {exc}", file=sys.stderr)
        return 2
    if table is None:
        return 0
    width = max(10, *(len(row) + 2 for row in table))
    print("bits per byte on held-out text (lower is better)")
    print(f"{'expert':<{width}}" + "".join(f"{n:>9}" for n in names))
    for expert, row in table.items():
        print(f"{expert:<{width}}" + "".join(f"{row[n]:>9.3f}" for n in names))
    return 0


def _build(args: argparse.Namespace, log: Callable[[str], None]) -> tuple[dict[str, dict[str, float]] | None,
                                                                          list[str]]:
    """Build what the options ask for; the bits-per-byte table (None with --no-eval) and its columns."""
    from fusekit.demo import build_demo_experts, evaluate_experts, load_expert_set

    started = time.perf_counter()
    if args.lora and (args.out_dir / "experts.json").is_file() and not args.overwrite:
        experts = load_expert_set(args.out_dir)
        log(f"keeping the experts in {experts.root}")
    else:
        experts = build_demo_experts(args.out_dir, quick=args.quick, seed=args.seed or 0,
                                     overwrite=args.overwrite, log=log)
        log(f"wrote {experts.root} in {time.perf_counter() - started:.0f} s")
    adapters = None
    if args.lora:
        from fusekit.demo import LoraSettings, build_demo_lora

        adapters = build_demo_lora(experts, settings=LoraSettings(rank=args.lora_rank), seed=args.seed,
                                   overwrite=args.overwrite, log=log)
    if args.no_eval:
        return None, []
    if adapters is not None:
        from fusekit.demo import evaluate_lora

        return evaluate_lora(experts, adapters, device=args.device), list(experts.heldout)
    return evaluate_experts(experts, device=args.device), list(experts.heldout)


if __name__ == "__main__":
    sys.exit(main())
