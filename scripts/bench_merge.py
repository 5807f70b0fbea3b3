"""Benchmark ``fusekit merge`` against the floor measured in the same run.

The floor is what any merge must pay: reading every input tensor (page cache warm), the merge
arithmetic alone on tensors already in memory, and writing the output bytes. Each is timed here,
tensor by tensor, then ``fusekit merge`` runs as a subprocess on the same recipe; the script prints
the ratio of its wall time to the floor, and its peak resident memory. Absolute times on a shared
machine mean little; the ratios are the figures to compare.

Models are built locally by ``fusekit.demo`` (three bf16 Llama checkpoints; ``--size 1b`` gives
~0.89 B parameters each) and reused on later runs.

Usage: python scripts/bench_merge.py [--sizes 1b ...] [--methods all | linear ties ...]
       [--modes] [--mergekit ties ...] [--workdir DIR] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from fusekit.demo import build_demo_models
from fusekit.io.layout import tensor_bytes
from fusekit.io.reader import CheckpointReader
from fusekit.io.refs import resolve_model
from fusekit.ops import MergeInputs, get_method, method_names
from fusekit.plan import build_plan
from fusekit.recipe import parse_merge_recipe

SIZES = {  # hidden, layers, intermediate, heads, kv heads, vocab
    "small": (512, 4, 1408, 8, 4, 8000),
    "0.5b": (1536, 12, 4096, 12, 4, 32000),
    "1b": (2048, 16, 5632, 16, 8, 32000),
    "2b": (2560, 24, 6912, 20, 4, 32000),
}
MODES = {  # label -> extra `fusekit merge` arguments; only linear runs all of them
    "pipelined": (),
    "sequential": ("--sequential",),
    "512MB": ("--max-memory", "512MB"),
}
_TV = "{{model: {m}, parameters: {{weight: 0.5, density: 0.5{extra}}}}}"
_W = "{{model: {m}, parameters: {{weight: {w}}}}}"


def _recipe(method: str, models: list[str], base: str | None = None, params: str = "") -> str:
    lines = [f"merge_method: {method}"] + ([f"base_model: {base}"] if base else [])
    lines += ["models:", *[f"  - {m}" for m in models]]
    return "\n".join(lines + ([f"parameters: {{{params}}}"] if params else [])) + "\n"


def recipe_for(method: str, paths: dict[str, Path]) -> str:
    """A recipe for ``method`` on the bench models (base + the fine-tunes math and code)."""
    b, m, c = (str(paths[k]) for k in ("base", "math", "code"))
    plain = [f"{{model: {x}}}" for x in (m, c)]
    weighted = [_W.format(m=x, w=w) for x, w in ((b, 0.4), (m, 0.3), (c, 0.3))]
    task_vectors = {
        "task_arithmetic": "", "ties": "", "dare_linear": "", "dare_ties": "",
        "breadcrumbs": ", gamma: 0.01", "breadcrumbs_ties": ", gamma: 0.01",
        "della": ", epsilon: 0.1", "della_linear": ", epsilon: 0.1",
    }
    if method in task_vectors:
        return _recipe(method, [_TV.format(m=x, extra=task_vectors[method]) for x in (m, c)], b)
    table = {
        "linear": lambda: _recipe(method, weighted),
        "sce": lambda: _recipe(method, plain, b, "select_topk: 0.5"),
        "model_stock": lambda: _recipe(method, plain, b),
        "ram": lambda: _recipe(method, plain, b),
        "ramplus_tl": lambda: _recipe(method, plain, b),
        "nearswap": lambda: _recipe(method, plain[:1], b, "t: 0.001"),
        "arcee_fusion": lambda: _recipe(method, plain[:1], b),
        "slerp": lambda: _recipe(method, plain[:1], b, "t: 0.4"),
        "nuslerp": lambda: _recipe(method, weighted[1:]),
        "multislerp": lambda: _recipe(method, weighted),
        "karcher": lambda: _recipe(method, [f"{{model: {x}}}" for x in (b, m, c)]),
        "passthrough": lambda: _recipe(method, [f"{{model: {m}}}"]),
    }
    return table[method]()


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


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RssAnon, VmRSS) of a live process in KiB; zeros once it has exited."""
    values = {"RssAnon:": 0, "VmRSS:": 0}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                key = line.split(":")[0] + ":"
                if key in values:
                    values[key] = int(line.split()[1])
    except OSError:
        pass
    return values["RssAnon:"], values["VmRSS:"]


def run_fusekit(recipe_path: Path, out_dir: Path, *extra: str) -> dict[str, float]:
    """Run ``fusekit merge`` in a fresh process: wall time, its own merge time and memory."""
    command = [sys.executable, "-m", "fusekit", "merge", str(recipe_path), str(out_dir),
               "--force", "--format", "json", "--random-seed", "0", *extra]  # never "up to date"
    return _timed(command, lambda out: {"merge": json.loads(out)["seconds"]})


def plan_estimate(recipe_path: Path, *extra: str) -> int:
    """``fusekit plan``'s peak-memory estimate for the same recipe and limits."""
    proc = subprocess.run([sys.executable, "-m", "fusekit", "plan", str(recipe_path), "--format",
                           "json", *extra], capture_output=True, text=True, check=True)
    return int(json.loads(proc.stdout)["peak_memory_bytes"])


def run_mergekit(recipe_path: Path, out_dir: Path) -> dict[str, float] | None:
    """Time mergekit 0.1.5 (installed by scripts/parity_mergekit.py into its throwaway venv)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from parity_mergekit import ensure_venv

    python = ensure_venv(Path(tempfile.gettempdir()) / "fusekit-parity" / "venv-mergekit",
                         reinstall=False, torch_index_url=None)
    mergekit_yaml = python.parent / "mergekit-yaml"
    command = [str(mergekit_yaml), str(recipe_path), str(out_dir), "--device", "cpu",
               "--quiet", "--random-seed", "0"]
    shutil.rmtree(out_dir, ignore_errors=True)
    return _timed(command, None)


def _timed(command: list[str], parse: Callable[[str], dict[str, float]] | None) -> dict[str, float]:
    """Run ``command``; wall time, peak resident and peak anonymous memory sampled every 10 ms."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_rss = 0
    while proc.poll() is None:
        anon, rss = _memory_kib(proc.pid)
        peak_anon, peak_rss = max(peak_anon, anon), max(peak_rss, rss)
        time.sleep(0.01)
    wall = time.perf_counter() - start
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{Path(command[0]).name} failed: {stderr.strip()[-2000:]}")
    result = {"wall": wall, "peak_anon": peak_anon * 1024.0, "peak_rss": peak_rss * 1024.0}
    return {**result, **(parse(stdout) if parse else {})}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="--mergekit installs mergekit==0.1.5 (and torch==2.13.0) from PyPI into a throwaway "
               "venv under /tmp/fusekit-parity (shared with scripts/parity_mergekit.py) and times it "
               "on the same recipes; mergekit is never a fusekit dependency.")
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=["1b"])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fusekit-bench")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best is kept")
    parser.add_argument("--methods", nargs="+", default=["linear"],
                        help="merge methods to time, or 'all' (every registered method)")
    parser.add_argument("--mergekit", nargs="*", default=[], metavar="METHOD",
                        help="also time mergekit 0.1.5 on these methods (e.g. ties linear)")
    parser.add_argument("--modes", action="store_true",
                        help="time linear pipelined, sequential and with --max-memory 512MB")
    args = parser.parse_args()
    methods = method_names() if args.methods == ["all"] else args.methods
    methods = sorted(methods, key=lambda m: m != "linear")  # linear first: the others' yardstick
    print(f"{'size':<6}{'method':<18}{'mode':<11}{'wall s':>8}{'merge s':>8}{'floor s':>8}"
          f"{'ratio':>7}{'/linear':>8}{'mergekit s':>11}{'speedup':>8}{'peak RSS':>9}{'anon':>7}"
          f"{'estimate':>9}", flush=True)
    for size in args.sizes:
        models = build_models(args.workdir, size)
        linear_time = None
        for method in methods:
            recipe_path = args.workdir / f"{method}-{size}.yaml"
            recipe_path.write_text(recipe_for(method, models))
            floors = [measure_floor(recipe_path, args.workdir / "floor.bin") for _ in range(args.repeat)]
            floor = min(f["floor"] for f in floors)
            modes = MODES if method == "linear" and args.modes else {"pipelined": ()}
            for mode, extra in modes.items():
                runs = [run_fusekit(recipe_path, args.workdir / f"out-{method}", *extra)
                        for _ in range(args.repeat)]
                run = min(runs, key=lambda r: r["merge"])
                if method == "linear" and mode == "pipelined":
                    linear_time = run["merge"]
                mergekit = (run_mergekit(recipe_path, args.workdir / f"mk-{method}")
                            if method in args.mergekit and mode == "pipelined" else None)
                estimate = plan_estimate(recipe_path, *[e for e in extra if e != "--sequential"])
                mk = f"{mergekit['wall']:>11.1f}{mergekit['wall'] / run['wall']:>8.2f}" if mergekit \
                    else f"{'-':>11}{'-':>8}"
                rel = f"{run['merge'] / linear_time:>8.2f}" if linear_time else f"{'-':>8}"
                print(f"{size:<6}{method:<18}{mode:<11}{run['wall']:>8.2f}{run['merge']:>8.2f}"
                      f"{floor:>8.2f}{run['merge'] / floor:>7.2f}{rel}{mk}"
                      f"{run['peak_rss'] / 2**30:>8.2f}G{run['peak_anon'] / 2**30:>6.2f}G"
                      f"{estimate / 2**30:>8.2f}G", flush=True)
    print("ratio: fusekit's merge time / (read + math + write floor) in the same run; /linear: merge "
          "time over linear's; speedup: mergekit wall / fusekit wall (both include start-up); anon: "
          "peak anonymous memory sampled every 10 ms; estimate: fusekit plan's peak", file=sys.stderr)


if __name__ == "__main__":
    main()
