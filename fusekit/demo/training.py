"""Training the demo experts: small Llama models trained on CPU from crops of token streams, each
run in this process or in its own single-threaded spawned process, deterministic given the seed."""

from __future__ import annotations

import hashlib
import math
import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fusekit.demo.settings import DOMAINS, BuildSizes
from fusekit.demo.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, PAD_TOKEN_ID

OWN_SHARE = 0.85  # share of each expert's training crops taken from its own domain


def _llama_config(sizes: BuildSizes, vocab_size: int) -> Any:
    from fusekit.lm.load import import_transformers

    return import_transformers().LlamaConfig(
        vocab_size=vocab_size, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads, max_position_embeddings=sizes.context, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=BOS_TOKEN_ID, eos_token_id=EOS_TOKEN_ID,
        pad_token_id=PAD_TOKEN_ID)


def derive_seed(seed: int, *parts: str) -> int:
    """A 63-bit seed derived from ``seed`` and a path of names, stable across processes."""
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class TrainingJob:
    """One training run: ``mixture`` gives each domain's share of the crops; ``init`` a model to
    start from (None: a fresh, seeded initialisation); ``after`` a job that must finish first."""

    name: str
    mixture: dict[str, float]
    streams: dict[str, torch.Tensor]
    sizes: BuildSizes
    steps: int
    vocab_size: int
    seed: int
    folder: Path
    init: Path | None = None
    after: str | None = None


def run_jobs(jobs: Sequence[TrainingJob], workers: int,
             train: Callable[[TrainingJob], tuple[float, float]] | None = None,
             ) -> Iterator[tuple[str, tuple[float, float]]]:
    """Run ``train`` (default :func:`train_model`; a module-level function, so spawned processes can
    run it) on each job, in this process or in ``workers`` spawned ones."""
    train = train or train_model
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread beats two, and is deterministic
        try:
            for job in sorted(jobs, key=lambda j: j.after is not None):
                yield job.name, train(job)
        finally:
            torch.set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")
    waiting = [j for j in jobs if j.after is not None]
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        running = {pool.submit(train, j): j.name for j in jobs if j.after is None}
        while running:
            future = next(as_completed(running))
            name = running.pop(future)
            yield name, future.result()
            for job in [j for j in waiting if j.after == name]:
                waiting.remove(job)
                running[pool.submit(train, job)] = job.name


def train_model(job: TrainingJob) -> tuple[float, float]:
    """Train one model on crops drawn from the domains by ``job.mixture``; save it in ``job.folder``.

    Returns:
        (mean loss of the last tenth of the steps, seconds taken).
    """
    from fusekit.lm.load import import_transformers

    started = time.perf_counter()
    torch.set_num_threads(1)
    transformers = import_transformers()
    if job.init is None:
        torch.manual_seed(derive_seed(job.seed, job.name, "init"))
        model = transformers.LlamaForCausalLM(_llama_config(job.sizes, job.vocab_size))
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(job.init, dtype=torch.float32)
    losses = fit(model, job, model.parameters())
    job.folder.mkdir(exist_ok=True)
    model.save_pretrained(job.folder)
    return tail_loss(losses), time.perf_counter() - started


def fit(model: Any, job: TrainingJob, parameters: Iterable[torch.nn.Parameter]) -> list[float]:
    """Train ``parameters`` of ``model`` for ``job.steps`` AdamW steps (linear warm-up, cosine decay
    to 10% of ``job.sizes.lr``) on crops drawn from the domains by ``job.mixture``, each crop
    ``<s>`` + ``seq - 1`` tokens; the crops depend only on ``job.seed`` and ``job.name``.

    Returns:
        The loss of every step; ``model`` is left in eval mode.
    """
    sizes = job.sizes
    model.train()
    gen = torch.Generator().manual_seed(derive_seed(job.seed, job.name, "data"))
    domains = list(job.mixture)
    weights = torch.tensor([job.mixture[d] for d in domains])
    trained = list(parameters)
    optimizer = torch.optim.AdamW(trained, lr=sizes.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, job.steps // 15)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, job.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    losses: list[float] = []
    for _ in range(job.steps):
        picks = torch.multinomial(weights, sizes.batch, replacement=True, generator=gen)
        rows = []
        for pick in picks.tolist():
            stream = job.streams[domains[pick]]
            start = int(torch.randint(0, len(stream) - sizes.seq, (1,), generator=gen))
            rows.append(torch.cat([torch.tensor([BOS_TOKEN_ID]), stream[start:start + sizes.seq - 1]]))
        batch = torch.stack(rows)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


def tail_loss(losses: Sequence[float]) -> float:
    """The mean loss of the last tenth of the steps."""
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail)


def domain_mixture(domain: str | None) -> dict[str, float]:
    """Equal shares (the base), or ``OWN_SHARE`` for ``domain`` and the rest split evenly."""
    if domain is None:
        return dict.fromkeys(DOMAINS, 1 / len(DOMAINS))
    rest = (1 - OWN_SHARE) / (len(DOMAINS) - 1)
    return {d: OWN_SHARE if d == domain else rest for d in DOMAINS}

