"""Benchmark ``fusekit merge`` against the floor measured in the same run.

The floor is what any merge must pay: reading every input tensor (page cache warm), the merge
arithmetic alone on tensors already in memory, and writing the output bytes. Each is timed here,
tensor by tensor, then ``fusekit merge`` runs as a subprocess on the same recipe; the script prints
the ratio of its wall time to the floor, and its peak resident memory. Absolute times on a shared
machine mean little; the ratios are the figures to compare.

Models are built locally by ``fusekit.demo`` (three bf16 Llama checkpoints; ``--size 1b`` gives
~0.89 B parameters each) and reused on later runs.

Usage: python scripts/bench_merge.py [--size 1b|0.5b|2b|small] [--workdir DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from fusekit.demo import build_demo_models
from fusekit.io.layout import tensor_bytes
from fusekit.io.reader import CheckpointReader
from fusekit.io.refs import resolve_model
from fusekit.ops import MergeInputs, get_method
from fusekit.plan import build_plan
from fusekit.recipe import parse_merge_recipe

SIZES = {  # hidden, layers, intermediate, heads, kv heads, vocab
    "small": (512, 4, 1408, 8, 4, 8000),
    "0.5b": (1536, 12, 4096, 12, 4, 32000),
    "1b": (2048, 16, 5632, 16, 8, 32000),
    "2b": (2560, 24, 6912, 20, 4, 32000),
}
MODES = {  # label -> extra `fusekit merge` arguments
    "pipelined": (),
    "sequential": ("--sequential",),
    "512MB": ("--max-memory", "512MB"),
}
RECIPES = {
    "linear": """merge_method: linear
models:
  - {{model: {base}, parameters: {{weight: 0.4}}}}
  - {{model: {math}, parameters: {{weight: 0.3}}}}
  - {{model: {code}, parameters: {{weight: 0.3}}}}
""",
}


def build_models(workdir: Path, size: str) -> dict[str, Path]:
    folder = workdir / f"models-{size}"
    marker = folder / ".complete"
    names = ("base", "math", "code")
    if marker.exists():
        return {name: folder / name for name in names}
    hidden, layers, inter, heads, kv, vocab = SIZES[size]
    print(f"building three {size} bf16 models in {folder} ...", file=sys.stderr)
    models = build_demo_models(folder, names=names, hidden_size=hidden, num_layers=layers,
                               intermediate_size=inter, num_attention_heads=heads,
                               num_key_value_heads=kv, vocab_size=vocab, dtype=torch.bfloat16,
                               max_shard_bytes=2 * 10**9)
    marker.touch()
    return models


def measure_floor(recipe_path: Path, out_file: Path) -> dict[str, float]:
    """Time reading all inputs, the kernel alone, and writing the output bytes, separately."""
    recipe, _ = parse_merge_recipe(recipe_path.read_text(), str(recipe_path))
    plan = build_plan(recipe)
    readers = {ref: CheckpointReader(resolve_model(ref)) for ref in plan.models}
    read_s = compute_s = write_s = 0.0
    with out_file.open("wb") as handle:
        for task in plan.tasks:
            start = time.perf_counter()
            tensors = [readers[i.model].get(i.name) for i in task.inputs]
            base = readers[task.base.model].get(task.base.name) if task.base else None
            read_s += time.perf_counter() - start
            start = time.perf_counter()
            tensors = [t.to(task.compute_dtype) for t in tensors]
            inputs = MergeInputs(tensors=tensors, model_params=task.model_params,
                                 params=task.params,
                                 base=base.to(task.compute_dtype) if base is not None else None)
            result = get_method(task.method).kernel(inputs).to(task.out_dtype).contiguous()
            compute_s += time.perf_counter() - start
            start = time.perf_counter()
            handle.write(tensor_bytes(result))
            write_s += time.perf_counter() - start
        start = time.perf_counter()
        handle.flush()
        os.fsync(handle.fileno())
        write_s += time.perf_counter() - start
    out_file.unlink()
    return {"read": read_s, "compute": compute_s, "write": write_s,
            "floor": read_s + compute_s + write_s}


def _anon_kib(pid: int) -> int:
    """RssAnon of a live process in KiB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_fusekit(recipe_path: Path, out_dir: Path, *extra: str) -> dict[str, float]:
    """Run ``fusekit merge`` in a fresh process: wall time, its own merge time, peak resident
    memory (from the process) and peak anonymous memory (sampled every 10 ms from outside)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "fusekit", "merge", str(recipe_path),
                             str(out_dir), "--overwrite", "--format", "json", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = 0
    while proc.poll() is None:
        peak_anon = max(peak_anon, _anon_kib(proc.pid))
        time.sleep(0.01)
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"fusekit merge failed: {stderr.strip()}")
    stats = json.loads(stdout)
    return {"wall": wall, "merge": stats["seconds"], "peak_rss": stats["peak_rss_bytes"],
            "peak_anon": peak_anon * 1024}


def plan_estimate(recipe_path: Path, *extra: str) -> int:
    """``fusekit plan``'s peak-memory estimate for the same recipe and limits."""
    proc = subprocess.run([sys.executable, "-m", "fusekit", "plan", str(recipe_path), "--format",
                           "json", *extra], capture_output=True, text=True, check=True)
    return int(json.loads(proc.stdout)["peak_memory_bytes"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fusekit-bench")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best is kept")
    parser.add_argument("--methods", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    models = build_models(args.workdir, args.size)
    print(f"{'method':<14}{'mode':<12}{'fusekit s':>10}{'merge s':>9}{'floor s':>9}{'read':>7}"
          f"{'math':>7}{'write':>7}{'ratio':>7}{'peak RSS':>10}{'anon':>8}{'plan est':>10}")
    for method in args.methods:
        recipe_path = args.workdir / f"{method}.yaml"
        recipe_path.write_text(RECIPES[method].format(**{k: str(v) for k, v in models.items()}))
        floors = [measure_floor(recipe_path, args.workdir / "floor.bin") for _ in range(args.repeat)]
        floor = min(floors, key=lambda f: f["floor"])
        for mode, extra in MODES.items():
            runs = [run_fusekit(recipe_path, args.workdir / f"out-{method}", *extra)
                    for _ in range(args.repeat)]
            run = min(runs, key=lambda r: r["merge"])
            estimate = plan_estimate(recipe_path, *[e for e in extra if e != "--sequential"])
            print(f"{method:<14}{mode:<12}{run['wall']:>10.2f}{run['merge']:>9.2f}"
                  f"{floor['floor']:>9.2f}{floor['read']:>7.2f}{floor['compute']:>7.2f}"
                  f"{floor['write']:>7.2f}{run['merge'] / floor['floor']:>7.2f}"
                  f"{run['peak_rss'] / 2**30:>9.2f}G{run['peak_anon'] / 2**30:>7.2f}G"
                  f"{estimate / 2**30:>9.2f}G")
    print("ratio = fusekit's merge time / (read + math + write floor) measured in the same run; "
          "'fusekit s' adds Python start-up and imports; anon = peak anonymous memory sampled "
          "every 10 ms; plan est = fusekit plan's peak-memory estimate", file=sys.stderr)


if __name__ == "__main__":
    main()
