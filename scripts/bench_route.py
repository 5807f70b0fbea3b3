"""Routing decision time per query on CPU, as a ratio to one forward pass of the smallest model.

    python scripts/bench_route.py                       # builds configs/route/tfidf-knn.yaml once
    python scripts/bench_route.py ROUTER [ROUTER ...] --data demo-out/experts/data/test.jsonl

For every query of ``--data``, one at a time: the routing decision (features from the raw text +
router + threshold, exactly what ``fusekit route run`` does) and one forward pass of the smallest of
the router's models over the same query (batch 1, already tokenised, no gradient, no KV cache), both
timed in this process at the same torch thread count. Per query the fastest of ``--repeat`` runs
counts; the medians over queries and their ratio are printed (goal for tfidf/knn: under 5 ms and
under 10%). Both are timed with one thread and with torch's default (on a busy machine extra threads
often slow small work down); the row with the faster forward pass, the harder baseline, is marked,
unless ``--threads`` picks one setting.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusekit.io.reader import CheckpointReader  # noqa: E402
from fusekit.io.refs import resolve_model  # noqa: E402
from fusekit.route import build_router, load_examples, load_router  # noqa: E402

DEFAULT_RECIPE = ROOT / "configs" / "route" / "tfidf-knn.yaml"
CACHE = Path("/tmp/fusekit-bench-route")


def n_parameters(ref: str) -> int:
    with CheckpointReader(resolve_model(ref)) as reader:
        return sum(math.prod(info.shape) for info in reader.infos.values())


def time_ms(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1000)
    return min(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("routers", nargs="*", type=Path, help="router folders (default: build "
                        f"{DEFAULT_RECIPE.relative_to(ROOT)} into {CACHE})")
    parser.add_argument("--data", type=Path, default=Path("demo-out/experts/data/test.jsonl"))
    parser.add_argument("--queries", type=int, default=100, help="how many queries of --data to time")
    parser.add_argument("--repeat", type=int, default=3, help="timings per query; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for both "
                        "(default: both 1 and torch's default, one row each)")
    parser.add_argument("--format", choices=("text", "json"), default="text")
    args = parser.parse_args()
    routers = args.routers
    if not routers:
        target = CACHE / DEFAULT_RECIPE.stem
        if not (target / "router.json").is_file():
            print(f"building {target} from {DEFAULT_RECIPE} ...", file=sys.stderr)
            build_router(DEFAULT_RECIPE, target, overwrite=True)
        routers = [target]
    queries = [e.query for e in load_examples(args.data)][:args.queries]
    rows = []
    default_threads = torch.get_num_threads()
    settings = sorted({1, default_threads}) if args.threads is None else [args.threads]
    loaded = [load_router(folder) for folder in routers]
    forward_ms: dict[tuple[str, int], float] = {}  # (smallest model, threads) -> median ms
    for threads in settings:
        torch.set_num_threads(threads)
        for folder, router in zip(routers, loaded, strict=True):
            refs = [m.reference() for m in router.models]
            smallest = min(refs, key=n_parameters)
            if (smallest, threads) not in forward_ms:
                forward_ms[smallest, threads] = time_forward(smallest, queries, args.repeat)
            router.route(queries[0])  # warm-up
            route_ms = statistics.median(time_ms(lambda q=q, r=router: r.route(q), args.repeat)
                                         for q in queries)
            base = forward_ms[smallest, threads]
            rows.append({"router": str(folder), "features": router.featurizer.kind,
                         "kind": router.fitted.kind, "threads": threads, "queries": len(queries),
                         "route_ms": route_ms, "smallest_model": smallest, "forward_ms": base,
                         "ratio": route_ms / base})
    # the headline per router: the thread setting with the fastest forward pass (the harder baseline)
    for row in rows:
        same = [r for r in rows if r["router"] == row["router"]]
        row["headline"] = row is min(same, key=lambda r: r["forward_ms"])
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return
    print(f"{'router':<36} {'features':<9} {'router':<8} {'threads':>7} {'decision ms':>11} "
          f"{'forward ms':>10} {'ratio':>7}")
    for r in rows:
        print(f"{r['router']:<36} {r['features']:<9} {r['kind']:<8} {r['threads']:>7} {r['route_ms']:>11.3f} "
              f"{r['forward_ms']:>10.3f} {r['ratio']:>7.1%}{'  *' if r['headline'] else ''}")
    print(f"(median over {len(queries)} queries of the fastest of {args.repeat} runs each; decision and "
          "forward pass (smallest model, batch 1, same query) at the same torch thread count; "
          "* = the thread count with the faster forward pass)")


def time_forward(ref: str, queries: list[str], repeat: int) -> float:
    """Median over ``queries`` of the fastest of ``repeat`` forward passes of ``ref`` (batch 1)."""
    from fusekit.lm import load_lm

    lm = load_lm(ref)
    assert lm.tokenizer is not None
    encoded = [lm.tokenizer(q, return_tensors="pt")["input_ids"] for q in queries]

    def forward(ids: torch.Tensor) -> None:
        with torch.inference_mode():
            lm.model(input_ids=ids, use_cache=False)

    forward(encoded[0])  # warm-up
    return statistics.median(time_ms(lambda ids=ids: forward(ids), repeat) for ids in encoded)


if __name__ == "__main__":
    main()
