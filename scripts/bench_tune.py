"""Wall time of the same ``fusekit tune`` search with 1 and with 2 workers, in one run.

    python scripts/bench_tune.py configs/tune/merge-cma.yaml --out /tmp/bench-tune
    python scripts/bench_tune.py RECIPE --workers 1 2 4 --evaluations 20

Each worker count runs the whole search afresh (``overwrite``) into ``OUT/workers-N``: one worker in
this process, more on a local Ray instance (its start-up is part of the time, as a user pays it). The
table gives each run's wall time (search and report), the search's own time (``state.json``'s
``elapsed_s``: Ray's start-up included, the final report not), the search time per evaluation and
its speed-up over the first; the last column says whether the run's candidates and best.yaml are
the same as the first's (they must be: the result does not depend on the number of workers).
``--evaluations`` overrides the recipe's budget through a copy of the recipe written beside the
outputs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fusekit.tune import tune  # noqa: E402


def with_budget(recipe: Path, evaluations: int | None, out: Path) -> Path:
    """``recipe`` itself, or a copy in ``out`` whose budget is ``evaluations``."""
    if evaluations is None:
        return recipe
    data = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    data["tune"]["budget"] = {"evaluations": evaluations}
    copy = out / f"{recipe.stem}-{evaluations}.yaml"
    copy.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return copy


def scores(folder: Path) -> list[float]:
    lines = (folder / "candidates.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line)["score"] for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe", type=Path, help="a tune recipe")
    parser.add_argument("--out", type=Path, default=Path("/tmp/fusekit-bench-tune"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--evaluations", type=int, default=None, help="override the recipe's budget")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = with_budget(args.recipe, args.evaluations, args.out)
    rows = []
    for workers in args.workers:
        out = args.out / f"workers-{workers}"
        start = time.perf_counter()
        result = tune(recipe, out, device=args.device, workers=workers, overwrite=True)
        search_s = json.loads((out / "state.json").read_text(encoding="utf-8"))["elapsed_s"]
        rows.append({"workers": workers, "seconds": time.perf_counter() - start, "search": search_s,
                     "evaluations": len(result.candidates), "best": result.best.score,
                     "best_yaml": (out / "best.yaml").read_text(encoding="utf-8"), "scores": scores(out)})
    first = rows[0]
    print(f"{'workers':>7}  {'wall s':>8}  {'search s':>8}  {'s/eval':>7}  {'speed-up':>8}  {'best bpb':>9}  "
          "same result")
    for row in rows:
        same = row["scores"] == first["scores"] and row["best_yaml"] == first["best_yaml"]
        print(f"{row['workers']:>7}  {row['seconds']:>8.1f}  {row['search']:>8.1f}  "
              f"{row['search'] / row['evaluations']:>7.2f}  {first['search'] / row['search']:>8.2f}  "
              f"{row['best']:>9.4f}  {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
