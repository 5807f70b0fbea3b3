"""Benchmark ``fusekit serve`` under load: 1, 4 and 16 concurrent clients against a demo model.

Steps (each client loops ``POST /v1/completions`` with ``temperature: 0`` and a fixed ``max_tokens``
for ``--seconds``, prompts taken in turn from the first lines of ``--prompts``):

1. In-process baseline: :func:`fusekit.lm.generate.generate` on the same prompts, one prompt at a
   time and ``--max-batch`` at a time (generated tokens per second; the server is not running).
2. ``fusekit serve MODEL --max-batch B --max-queue Q`` in a child process; 1, 4, 16 clients: requests
   and generated tokens (``usage.completion_tokens``) per second, p50/p99 latency, failed requests
   (anything but a 200; must be 0 below the queue limit) and the largest batch seen.
3. Past the queue limit: a second server with ``--max-batch 2 --max-queue 2`` and ``--overload``
   clients; every answer must be a 200 or a 429 (with ``Retry-After``), nothing else.

``--direct`` skips HTTP and drives :func:`fusekit.serve.backends.load_backend` in-process instead (the
batching alone, without the server's overhead).

Usage: python scripts/bench_serve.py [--model demo-out/experts/python]
       [--prompts demo-out/experts/heldout/python.txt] [--seconds 20] [--max-tokens 64]
       [--clients 1 4 16] [--overload 24] [--threads 1] [--direct] [--json /tmp/S2/bench.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Load:
    """What the clients of one run saw."""

    clients: int
    seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    retry_after: set[str] = field(default_factory=set)

    def row(self) -> dict[str, Any]:
        ok = self.statuses.get(200, 0)
        lat = sorted(self.latencies)
        return {"clients": self.clients, "requests": ok, "requests_per_s": round(ok / self.seconds, 2),
                "tokens_per_s": round(self.tokens / self.seconds, 1),
                "p50_s": round(lat[len(lat) // 2], 3) if lat else None,
                "p99_s": round(lat[min(len(lat) - 1, int(0.99 * len(lat)))], 3) if lat else None,
                "failed": sum(n for s, n in self.statuses.items() if s != 200),
                "statuses": dict(sorted(self.statuses.items()))}


def read_prompts(path: Path, count: int = 64, width: int = 48) -> list[str]:
    """The first ``count`` non-blank lines of ``path``, each cut to ``width`` characters."""
    lines = [ln[:width] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    return lines[:count]


def baseline(model: str, prompts: list[str], max_tokens: int, batch: int) -> dict[str, float]:
    """Generated tokens per second of ``fusekit.lm.generate`` in-process: one prompt at a time, and
    ``batch`` prompts at a time (EOS is not a stop, so every prompt yields ``max_tokens``)."""
    from fusekit.lm import load_lm
    from fusekit.lm.generate import generate

    lm = load_lm(model)
    generate(lm, prompts[:2], max_new_tokens=4)  # warm-up
    out = {}
    runs = (("generate_1", 1, prompts[:8]), (f"generate_{batch}", batch, prompts[:2 * batch]))
    for label, size, chosen in runs:
        started = time.perf_counter()
        generate(lm, chosen, max_new_tokens=max_tokens, batch_size=size, stop_at_eos=False)
        out[label] = round(len(chosen) * max_tokens / (time.perf_counter() - started), 1)
    return out


async def http_client(base: str, model: str, prompts: list[str], max_tokens: int, until: float, offset: int,
                      load: Load) -> None:
    """One client: requests back to back until ``until``; after a 429 it waits 50 ms."""
    import httpx

    async with httpx.AsyncClient(base_url=base, timeout=300) as client:
        i = offset
        while time.perf_counter() < until:
            body = {"model": model, "prompt": prompts[i % len(prompts)], "max_tokens": max_tokens,
                    "temperature": 0}
            i += 1
            started = time.perf_counter()
            try:
                response = await client.post("/v1/completions", json=body)
            except httpx.HTTPError:
                load.statuses[-1] += 1
                continue
            load.statuses[response.status_code] += 1
            if response.status_code == 200:
                load.latencies.append(time.perf_counter() - started)
                load.tokens += int(response.json()["usage"]["completion_tokens"])
            else:
                load.retry_after.add(response.headers.get("retry-after", "missing"))
                await asyncio.sleep(0.05)


async def direct_client(backend: Any, prompts: list[str], max_tokens: int, until: float, offset: int,
                        load: Load) -> None:
    """One in-process client of a backend (no HTTP)."""
    from fusekit.serve.backends import QueueFull, SamplingParams

    i = offset
    while time.perf_counter() < until:
        started = time.perf_counter()
        try:
            n = 0
            params = SamplingParams(max_tokens=max_tokens)
            async for delta in backend.stream(prompts[i % len(prompts)], params):
                n += len(delta.token_ids)
        except QueueFull as exc:
            load.statuses[429] += 1
            load.retry_after.add(str(exc.retry_after))
            await asyncio.sleep(0.05)
            continue
        finally:
            i += 1
        load.statuses[200] += 1
        load.latencies.append(time.perf_counter() - started)
        load.tokens += n


async def run_load(clients: int, seconds: float, make: Any) -> Load:
    """``clients`` clients made by ``make(until, offset, load)`` for ``seconds``."""
    load = Load(clients)
    started = time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(make(until, 7 * c, load) for c in range(clients)))
    load.seconds = time.perf_counter() - started
    return load


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(model: str, port: int, max_batch: int, max_queue: int,
                 threads: int) -> subprocess.Popen[bytes]:
    """``fusekit serve MODEL`` in a child process, returned once ``/health`` answers."""
    import httpx

    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, "-m", "fusekit", "serve", model, "--name", "bench", "--port", str(port),
           "--max-batch", str(max_batch), "--max-queue", str(max_queue)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    for _ in range(600):
        if proc.poll() is not None:
            raise SystemExit(f"fusekit serve exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("fusekit serve did not answer /health within 120 s")


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    proc.terminate()
    return proc.wait(timeout=60)


def http_runs(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Load], Load]:
    """The client runs against one server, then the overload run against a small-queue server."""
    port = free_port()
    proc = start_server(args.model, port, args.max_batch, args.max_queue, args.threads)
    base = f"http://127.0.0.1:{port}"

    def make(until: float, offset: int, load: Load) -> Any:
        return http_client(base, "bench", prompts, args.max_tokens, until, offset, load)

    try:
        asyncio.run(run_load(1, 2.0, make))  # warm-up
        loads = [asyncio.run(run_load(c, args.seconds, make)) for c in args.clients]
    finally:
        print(f"server exit status {stop_server(proc)}", file=sys.stderr)
    port = free_port()
    proc = start_server(args.model, port, 2, 2, args.threads)
    base = f"http://127.0.0.1:{port}"
    try:
        over = asyncio.run(run_load(args.overload, args.seconds / 2, make))
    finally:
        stop_server(proc)
    return loads, over


def direct_runs(args: argparse.Namespace, prompts: list[str]) -> tuple[list[Load], Load]:
    """The same runs against in-process backends."""
    from fusekit.serve.backends import load_backend

    async def with_backend(clients: int, seconds: float, max_batch: int, max_queue: int) -> Load:
        backend = load_backend("bench", "model", args.model, max_batch=max_batch, max_queue=max_queue)

        def make(until: float, offset: int, load: Load) -> Any:
            return direct_client(backend, prompts, args.max_tokens, until, offset, load)

        try:
            return await run_load(clients, seconds, make)
        finally:
            await backend.close()

    loads = [asyncio.run(with_backend(c, args.seconds, args.max_batch, args.max_queue)) for c in args.clients]
    return loads, asyncio.run(with_backend(args.overload, args.seconds / 2, 2, 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(ROOT / "demo-out/experts/python"))
    parser.add_argument("--prompts", type=Path, default=ROOT / "demo-out/experts/heldout/python.txt")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--max-queue", type=int, default=64)
    parser.add_argument("--overload", type=int, default=24, help="clients of the run past the queue limit")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads here and OMP_NUM_THREADS of the server (on a busy 2-core machine "
                             "more threads spin against each other)")
    parser.add_argument("--direct", action="store_true", help="drive the backends in-process, no HTTP")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts)
    base = baseline(args.model, prompts, args.max_tokens, args.max_batch)
    loads, over = (direct_runs if args.direct else http_runs)(args, prompts)
    rows = [load.row() for load in loads]
    print(f"in-process fusekit.lm.generate: {base} tokens/s")
    print(f"{'clients':>7} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} {'failed':>6}")
    for r in rows:
        print(f"{r['clients']:>7} {r['requests_per_s']:>7} {r['tokens_per_s']:>8} {r['p50_s']:>7} "
              f"{r['p99_s']:>7} {r['failed']:>6}")
    speedup = rows[-1]["tokens_per_s"] / max(rows[0]["tokens_per_s"], 1e-9)
    print(f"{rows[-1]['clients']} clients / {rows[0]['clients']} client tokens/s: {speedup:.2f}x")
    print(f"past the queue limit ({args.overload} clients, max_batch 2, max_queue 2): "
          f"statuses {dict(over.statuses)}, Retry-After values {sorted(over.retry_after)}")
    if args.json is not None:
        result = {"mode": "direct" if args.direct else "http", "model": args.model,
                  "max_tokens": args.max_tokens, "baseline_tokens_per_s": base, "runs": rows,
                  "speedup": round(speedup, 2), "overload": over.row()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
