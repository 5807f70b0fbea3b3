"""Benchmark LoRA work: ``fusekit lora extract`` (quality, speed, memory) against references measured here.

Extraction, part 1 (quality, on the demo experts): for each expert fine-tuned from the demo ``base``,
adapters are extracted at ranks 4/8/16/32, at ``--energy 0.9`` and at full rank (``--energy 1``),
with the embeddings factored too (``--embeddings lora``) and, for one rank, saved whole (``full``).
Each adapter is applied to the base with PEFT's ``merge_and_unload`` and scored with fusekit's
scorer (bits per byte on the held-out texts), beside the base and the full fine-tune. The full-rank
row shows what an adapter cannot carry (the experts' norms, which a LoRA adapter leaves as in base).

Extraction, part 2 (speed and memory, on a bigger synthetic fine-tune pair, hidden 1024 by default):
``fusekit lora extract --rank R --embeddings skip`` runs as a subprocess for each rank, and so does a
direct baseline that loads both checkpoints whole and runs ``torch.linalg.svd`` on every full ΔW of
the same modules (what mergekit-extract-lora does); wall time and peak RSS of each child
(``os.wait4``) are printed with the ratios fusekit / baseline, and the relative errors of both.
Absolute times on a shared machine mean little; compare the ratios.

Usage: python scripts/bench_lora.py [--experts demo-out/experts] [--workdir DIR] [--hidden 1024]
       [--layers 2] [--ranks 4 8 16 32] [--skip-quality] [--skip-speed] [--json]
(--experts is built with fusekit.demo when missing: a few CPU minutes; needs the 'lm' and 'lora'
extras.)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

RANKS = (4, 8, 16, 32)


# --- part 1: quality on the demo experts -------------------------------------------------------------


def _adapted_lm(base_lm: Any, adapter: Path) -> Any:
    """The base with ``adapter`` merged in by PEFT, as a LoadedLM fusekit's scorer takes."""
    import peft
    import transformers

    from fusekit.lm.load import LoadedLM

    model = transformers.AutoModelForCausalLM.from_pretrained(base_lm.folder, dtype=torch.float32)
    merged = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload().eval()
    return LoadedLM(str(adapter), base_lm.resolved, merged, base_lm.tokenizer, base_lm.device)


def _bpb(lm: Any, texts: dict[str, str]) -> dict[str, float]:
    from fusekit.lm.score import score_text

    return {name: score_text(lm, text).bits_per_byte for name, text in texts.items()}


def _settings() -> list[tuple[str, dict[str, Any]]]:
    rows = [(f"rank {r}", {"rank": r, "embeddings": "lora"}) for r in RANKS]
    rows += [("energy 0.9", {"energy": 0.9, "embeddings": "lora"}),
             ("full rank", {"energy": 1.0, "embeddings": "lora"}),
             ("rank 8, embeddings whole", {"rank": 8, "embeddings": "full"})]
    return rows


def quality(experts_dir: Path, workdir: Path, names: list[str]) -> list[dict[str, Any]]:
    """Relative error, adapter size and bits per byte of each extracted adapter, per expert."""
    from fusekit.demo import load_expert_set
    from fusekit.lm.load import load_lm
    from fusekit.lm.score import read_text_file
    from fusekit.lora.extract import extract_lora

    experts = load_expert_set(experts_dir)
    assert experts.base is not None, f"{experts_dir} has no base model"
    base_path = experts.base
    all_texts = {d: read_text_file(p) for d, p in experts.heldout.items()}
    base_lm = load_lm(base_path)
    rows = []
    for name in names:
        expert = experts.experts[name]
        texts = {"mixed": all_texts["mixed"], "own": all_texts[expert.domain]}  # the expert's domain
        rows.append({"expert": name, "adapter": "base", **_bpb(base_lm, texts)})
        rows.append({"expert": name, "adapter": "full fine-tune", **_bpb(load_lm(expert.path), texts)})
        for label, options in _settings():
            out = workdir / f"{name}-{label.replace(' ', '_').replace(',', '')}"
            result = extract_lora(str(base_path), str(expert.path), out, overwrite=True, **options)
            ranks = [m.rank for m in result.modules if m.rank]
            rows.append({"expert": name, "adapter": label, "relative_error": result.total_relative_error,
                         "ranks": f"{min(ranks)}-{max(ranks)}" if min(ranks) != max(ranks) else str(ranks[0]),
                         "bytes": (out / "adapter_model.safetensors").stat().st_size,
                         "seconds": result.seconds, **_bpb(_adapted_lm(base_lm, out), texts)})
    return rows


# --- part 2: speed and memory against a direct full-SVD baseline --------------------------------------


def _run_child(args: list[str]) -> tuple[float, int, str]:
    """Run a child process; its wall seconds, peak RSS in bytes (``os.wait4``) and stdout."""
    with tempfile.TemporaryFile("w+") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(args[:6])}... failed: {proc.stderr.read() if proc.stderr else ''}")
        out.seek(0)
        return seconds, usage.ru_maxrss * 1024, out.read()


def baseline(base: str, model: str, ranks: list[int], out: str) -> dict[str, Any]:
    """The direct way: load both checkpoints whole, full SVD of every block matrix's ΔW, truncate to
    the largest rank and save; the errors at every rank come from the same (optimal) SVD."""
    from safetensors.torch import load_file, save_file

    from fusekit.arch.names import layer_index

    start = time.perf_counter()
    b, m = load_file(f"{base}/model.safetensors"), load_file(f"{model}/model.safetensors")
    factors, norm2 = {}, 0.0
    err2 = dict.fromkeys(ranks, 0.0)
    rank = max(ranks)
    for name, w in b.items():
        if w.dim() != 2 or layer_index(name) is None or torch.equal(w, m[name]):
            continue
        delta = m[name].float() - w.float()
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        root = s[:rank].sqrt()
        lora_b, lora_a = u[:, :rank] * root, root[:, None] * vh[:rank]
        module = name.removesuffix(".weight")
        factors[f"base_model.model.{module}.lora_A.weight"] = lora_a.contiguous()
        factors[f"base_model.model.{module}.lora_B.weight"] = lora_b.contiguous()
        norm2 += float(delta.square().sum())
        for r in ranks:  # Eckart–Young: the rank-r error is the tail of the singular values
            err2[r] += float((s[r:].double() ** 2).sum())
    os.makedirs(out, exist_ok=True)
    save_file(factors, f"{out}/adapter_model.safetensors")
    return {"relative_error": {r: math.sqrt(e / norm2) for r, e in err2.items()},
            "seconds_inside": time.perf_counter() - start}


def speed(workdir: Path, hidden: int, layers: int, ranks: list[int]) -> list[dict[str, Any]]:
    """fusekit's extraction against the full-SVD baseline, each in its own process, per rank."""
    from fusekit.demo import build_demo_models

    folder = workdir / f"synthetic-{hidden}x{layers}"
    if not (folder / "tuned" / "model.safetensors").is_file():
        heads = max(4, hidden // 128)
        build_demo_models(folder, names=("base", "tuned"), hidden_size=hidden, num_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=max(2, heads // 4),
                          vocab_size=4096, with_tokenizer=False)
    base, tuned = str(folder / "base"), str(folder / "tuned")
    t_base, rss_base, text = _run_child([sys.executable, __file__, "--run-baseline", base, tuned,
                                         ",".join(map(str, ranks)), str(workdir / "baseline-out")])
    optimal = {int(r): e for r, e in json.loads(text)["relative_error"].items()}
    rows = [{"method": "full SVD baseline", "rank": max(ranks), "seconds": t_base, "peak_rss": rss_base,
             "relative_error": optimal[max(ranks)]}]
    for rank in ranks:
        seconds, rss, text = _run_child([sys.executable, "-m", "fusekit", "lora", "extract", "--base", base,
                                         "--model", tuned, str(workdir / f"synthetic-r{rank}"), "--rank",
                                         str(rank), "--embeddings", "skip", "--norms", "skip",
                                         "--overwrite", "--json"])
        report = json.loads(text)
        rows.append({"method": "fusekit lora extract", "rank": rank, "seconds": seconds, "peak_rss": rss,
                     "relative_error": report["total_relative_error"], "optimal_error": optimal[rank],
                     "time_ratio": seconds / t_base, "memory_ratio": rss / rss_base,
                     "svd": sorted({m["method"] for m in report["modules"] if m["method"]})})
    return rows


# --- report ------------------------------------------------------------------------------------------


def _print_quality(rows: list[dict[str, Any]]) -> None:
    domains = [k for k in rows[0] if k not in ("expert", "adapter")]
    print("\n## extraction quality (bits per byte on held-out mixed text and on the expert's own domain; "
          "lower is better)")
    print(f"{'expert':<8} {'adapter':<26} {'ranks':>6} {'rel.err':>8} {'KiB':>7} "
          + " ".join(f"{d:>8}" for d in domains))
    for r in rows:
        extra = (f"{r['ranks']:>6} {r['relative_error']:>8.4f} {r['bytes'] / 1024:>7.0f}" if "ranks" in r
                 else f"{'':>6} {'':>8} {'':>7}")
        print(f"{r['expert']:<8} {r['adapter']:<26} {extra} " + " ".join(f"{r[d]:>8.4f}" for d in domains))


def _print_speed(rows: list[dict[str, Any]]) -> None:
    print("\n## extraction speed and memory (each in its own process; ratios = fusekit / baseline)")
    print(f"{'method':<22} {'rank':>4} {'seconds':>8} {'peak MiB':>9} {'rel.err':>8} {'optimal':>8} "
          f"{'time x':>7} {'mem x':>6}  svd")
    for r in rows:
        ratios = (f"{r['optimal_error']:>8.4f} {r['time_ratio']:>7.3f} {r['memory_ratio']:>6.3f}  "
                  f"{','.join(r['svd'])}" if "time_ratio" in r else f"{'':>8} {'1':>7} {'1':>6}  exact (all)")
        print(f"{r['method']:<22} {r['rank']:>4} {r['seconds']:>8.2f} {r['peak_rss'] / 2**20:>9.0f} "
              f"{r['relative_error']:>8.4f} {ratios}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=Path, default=Path("demo-out/experts"))
    parser.add_argument("--names", nargs="+", default=["python", "c", "prose"])
    parser.add_argument("--workdir", type=Path, default=Path("demo-out/bench-lora"))
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON too")
    parser.add_argument("--run-baseline", nargs=4, metavar=("BASE", "MODEL", "RANKS", "OUT"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run_baseline:
        base, model, ranks, out = args.run_baseline
        print(json.dumps(baseline(base, model, [int(r) for r in ranks.split(",")], out)))
        return
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {}
    if not args.skip_quality:
        if not (args.experts / "experts.json").is_file():
            from fusekit.demo import build_demo_experts

            build_demo_experts(args.experts, log=lambda line: print(line, file=sys.stderr))
        report["quality"] = quality(args.experts, args.workdir, args.names)
        _print_quality(report["quality"])
    if not args.skip_speed:
        report["speed"] = speed(args.workdir, args.hidden, args.layers, args.ranks)
        _print_speed(report["speed"])
    if args.json:
        print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
