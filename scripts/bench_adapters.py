"""Benchmark one shared base for LoRA adapter members (:mod:`fusekit.lm.library`) against full models.

For N = 2, 4, 8 rank-8 adapters over the demo base (random PEFT adapters made under ``--workdir``;
``--real`` adds a row with the demo's three trained adapters), each configuration runs in a fresh
child process whose peak resident memory (``ru_maxrss`` from ``os.wait4``) is read when it exits:

- ``ensemble``: ``fusekit ensemble`` (prob_avg) over the N adapters: load, then generate ``--tokens``
  tokens for each of ``--prompts`` prompts; once on one shared base (``shared_base: true``) and once
  with every member a full model (``shared_base: false``: ``load_lm`` merges each adapter into its
  own copy of the base);
- ``router``: what ``route run`` loads: the N members (``load_members``), then each member alone
  generates ``--tokens`` tokens for one prompt.

A ``floor`` child imports the same libraries and the model's code and loads only the tokenizer: memory
above it is what the models (and their activations) take. Tokens per second come from one more child
per row that loads both configurations and alternates between them, best of ``--repeats`` each, so a
busy machine slows both alike; compare the ratios more than the absolute numbers.

Usage: python scripts/bench_adapters.py [--base demo-out/experts/base] [--workdir /tmp/H1]
       [--counts 2 4 8] [--tokens 32] [--prompts 4] [--threads 1] [--real demo-out/experts/lora]
       [--device cpu] [--synthetic HIDDEN LAYERS] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPTS = ["def fibonacci(n):", "int main(void) {", "The river ran", "for i in range(", "#include <",
           "She opened the door", "class Tree:", "while (x > 0)"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapters(base: Path, out: Path, count: int, *, rank: int = 8) -> list[Path]:
    """``count`` random rank-``rank`` PEFT LoRA adapters over ``base`` (non-zero B), made once."""
    import peft
    import torch
    import transformers

    folders = [out / f"random{k}" for k in range(count)]
    for k, folder in enumerate(folders):
        if (folder / "adapter_model.safetensors").is_file():
            continue
        torch.manual_seed(1000 + k)
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
        wrapped = peft.get_peft_model(model, config)
        with torch.no_grad():  # PEFT's random B is large; keep the adapters small updates
            for name, p in wrapped.named_parameters():
                if "lora_B" in name:
                    p.mul_(0.05)
        wrapped.save_pretrained(folder)
        config_path = folder / "adapter_config.json"
        data = json.loads(config_path.read_text())
        data["base_model_name_or_path"] = str(base.resolve())
        config_path.write_text(json.dumps(data, indent=2))
    return folders


def _synthetic_base(workdir: Path, hidden: int, layers: int) -> Path:
    """A random Llama base with the demo tokenizer, ``hidden`` wide and ``layers`` deep, made once."""
    from fusekit.demo import build_demo_models

    folder = workdir / f"synthetic-{hidden}x{layers}"
    if not (folder / "base" / "config.json").is_file():
        build_demo_models(folder, names=("base",), hidden_size=hidden, num_layers=layers,
                          num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64))
    return (folder / "base").resolve()


def _megabytes(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) / 2**20


# --- the child: one configuration ---------------------------------------------------------------------


def _ensemble(spec: dict[str, Any], share: bool) -> Callable[[], float]:
    """Load the ensemble; a function that generates once and returns its tokens per second."""
    from fusekit.ensemble.engine import Ensemble, load_members
    from fusekit.ensemble.recipe import parse_ensemble_recipe

    lines = ["models:", *(f"  - model: {ref}" for ref in spec["refs"]), "method: prob_avg",
             f"shared_base: {'true' if share else 'false'}"]
    recipe, _ = parse_ensemble_recipe("\n".join(lines) + "\n")
    ens = Ensemble(recipe, load_members(recipe, device=spec["device"]))

    def run() -> float:
        result = ens.generate(spec["prompts"], max_new_tokens=spec["tokens"], temperature=0.0)
        return result.new_tokens / result.seconds

    return run


def _router(spec: dict[str, Any], share: bool) -> Callable[[], float]:
    """Load the members as ``route run`` does; a function that sends one prompt to each member."""
    from fusekit.lm.generate import generate_ids, prompt_ids
    from fusekit.lm.library import load_members

    lms = load_members(spec["refs"], device=spec["device"], share=share)

    def run() -> float:
        begun, produced = time.perf_counter(), 0
        for k, lm in enumerate(lms):
            ids = prompt_ids(lm, spec["prompts"][k % len(spec["prompts"])])
            produced += len(generate_ids(lm, [ids], max_new_tokens=spec["tokens"], stop_at_eos=False)[0])
        return produced / (time.perf_counter() - begun)

    return run


USES = {"ensemble": _ensemble, "router": _router}


def _floor(spec: dict[str, Any]) -> dict[str, Any]:
    """The libraries, the model's code and a tokenizer: everything but weights and activations."""
    import importlib

    import peft  # noqa: F401
    import transformers

    from fusekit.ensemble.engine import Ensemble  # noqa: F401
    from fusekit.lm.load import load_tokenizer

    kind = transformers.AutoConfig.from_pretrained(spec["base"]).model_type
    importlib.import_module(f"transformers.models.{kind}.modeling_{kind}")
    load_tokenizer(spec["base"], Path(spec["base"]))
    return {}


def child(spec: dict[str, Any]) -> None:
    """Run one configuration and print its numbers as one JSON line.

    ``floor``: see :func:`_floor`; ``memory``: load the members one way (``share``) and generate once;
    ``speed``: load them both ways in this process and alternate generating, best of ``repeats``.
    """
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["mode"] == "floor":
        print(json.dumps(_floor(spec)))
        return
    use = USES[spec["use"]]
    if spec["mode"] == "memory":
        started = time.perf_counter()
        run = use(spec, spec["share"])
        loaded = time.perf_counter() - started
        print(json.dumps({"load_s": loaded, "tokens_per_second": run()}))
        return
    runs = {"shared": use(spec, True), "full": use(spec, False)}
    best = dict.fromkeys(runs, 0.0)
    for _ in range(spec["repeats"]):
        for name, run in runs.items():
            best[name] = max(best[name], run())
    print(json.dumps(best))


# --- the parent -----------------------------------------------------------------------------------------


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Run ``spec`` in a fresh interpreter; its numbers plus ``rss_mb``, its peak resident memory."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen([sys.executable, __file__, "--child", json.dumps(spec)], stdout=out,
                                stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"child {spec.get('mode')} {spec.get('use', '')} failed ({proc.returncode}): "
                             f"{err.read().strip()[-2000:]}")
        result: dict[str, Any] = json.loads(out.read().strip().splitlines()[-1])
    result["rss_mb"] = usage.ru_maxrss / 1024  # Linux: KiB
    return result


def _row(use: str, label: str, refs: list[str], args: argparse.Namespace, floor: float) -> dict[str, Any]:
    common = {"use": use, "refs": refs, "tokens": args.tokens, "prompts": PROMPTS[:args.prompts],
              "threads": args.threads, "repeats": args.repeats, "device": args.device}
    shared = measure({**common, "mode": "memory", "share": True})
    full = measure({**common, "mode": "memory", "share": False})
    speed = measure({**common, "mode": "speed"})
    row = {"use": use, "adapters": label, "shared_rss_mb": shared["rss_mb"], "full_rss_mb": full["rss_mb"],
           "shared_models_mb": shared["rss_mb"] - floor, "full_models_mb": full["rss_mb"] - floor,
           "shared_tok_s": speed["shared"], "full_tok_s": speed["full"],
           "shared_load_s": shared["load_s"], "full_load_s": full["load_s"]}
    row["rss_ratio"] = row["shared_rss_mb"] / row["full_rss_mb"]
    row["models_ratio"] = row["shared_models_mb"] / max(row["full_models_mb"], 1e-9)
    row["speed_ratio"] = row["shared_tok_s"] / row["full_tok_s"]
    print(_format(row), flush=True)
    return row


HEADER = (f"{'use':8} {'adapters':>8} {'RSS shared':>10} {'RSS full':>9} {'ratio':>6} {'above floor':>17} "
          f"{'ratio':>6} {'tok/s shared':>12} {'tok/s full':>10} {'ratio':>6}")


def _format(r: dict[str, Any]) -> str:
    above = f"{r['shared_models_mb']:7.1f}/{r['full_models_mb']:7.1f}"
    return (f"{r['use']:8} {r['adapters']:>8} {r['shared_rss_mb']:10.1f} {r['full_rss_mb']:9.1f} "
            f"{r['rss_ratio']:6.3f} {above:>17} {r['models_ratio']:6.3f} {r['shared_tok_s']:12.1f} "
            f"{r['full_tok_s']:10.1f} {r['speed_ratio']:6.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=Path("demo-out/experts/base"))
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/H1"))
    parser.add_argument("--counts", type=int, nargs="+", default=[2, 4, 8])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--real", type=Path, default=None, help="a folder of adapter folders (the demo's)")
    parser.add_argument("--synthetic", type=int, nargs=2, metavar=("HIDDEN", "LAYERS"), default=None,
                        help="instead of --base, a random base of this size (built under --workdir)")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    folder = args.workdir / "adapters"
    if args.synthetic is not None:
        args.base = _synthetic_base(args.workdir, *args.synthetic)
        folder = args.workdir / f"adapters-{args.synthetic[0]}x{args.synthetic[1]}"
    adapters = [str(p) for p in make_adapters(args.base, folder, max(args.counts))]
    print(f"base {args.base}: {_megabytes(args.base):.1f} MB of weights; each adapter "
          f"{_megabytes(Path(adapters[0])):.2f} MB", flush=True)
    floor = measure({"mode": "floor", "base": str(args.base), "threads": args.threads})["rss_mb"]
    print(f"floor (libraries and a tokenizer, no model): {floor:.1f} MB; MB columns: peak RSS; "
          "'above floor': shared/full", flush=True)
    print(HEADER, flush=True)
    rows = [_row(use, str(n), adapters[:n], args, floor)
            for use in ("ensemble", "router") for n in args.counts]
    if args.real is not None:
        real = [str(p) for p in sorted(args.real.iterdir()) if (p / "adapter_config.json").is_file()]
        rows += [_row(use, f"real{len(real)}", real, args, floor) for use in ("ensemble", "router")]
    if args.json:
        print(json.dumps({"floor_mb": floor, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
