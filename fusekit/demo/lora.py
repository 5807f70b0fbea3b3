"""Demo LoRA experts: one PEFT LoRA adapter per domain over the demo ``base``.

Each adapter trains on the same crops as the full expert of its domain (same seed, same 85% share of
its own domain, same steps and schedule; :func:`fusekit.demo.training.fit`), but only its low-rank
matrices learn: rank ``rank`` on every linear layer of attention and MLP (``LORA_TARGETS``), with
PEFT's own initialisation (``lora_B`` zero) seeded per domain. The text is rebuilt from the sources
and sizes recorded in ``experts.json`` and tokenized with the base's tokenizer, so no held-out text
and no router prompt is trained on. Output layout, next to the full experts::

    out/lora/lora.json          adapters, domains, settings, final losses, seconds
    out/lora/{python,c,prose}/  adapter_config.json (base_model_name_or_path: out/base, absolute),
                                adapter_model.safetensors, README.md

Needs the ``lora`` extra (peft). Deterministic given the seed (and the files on the machine).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusekit.demo.corpora import SOURCES, split_documents
from fusekit.demo.experts import ExpertSet, load_expert_set
from fusekit.demo.settings import DOMAINS, BuildSizes
from fusekit.demo.tokenizer import token_stream
from fusekit.demo.training import TrainingJob, derive_seed, domain_mixture, fit, run_jobs, tail_loss
from fusekit.errors import FusekitError
from fusekit.io.writer import atomic_output

LORA_JSON = "lora.json"
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """How the demo adapters are trained.

    Attributes:
        rank / alpha: LoRA rank and ``lora_alpha`` (scaling ``alpha / rank``).
        lr: peak learning rate (adapters learn faster than full fine-tunes; same schedule).
        steps: optimiser steps per adapter; None: as many as each full expert (``sizes.steps``).
    """

    rank: int = 8
    alpha: float = 16.0
    lr: float = 1e-2
    steps: int | None = None


@dataclass
class LoraSet:
    """What :func:`build_demo_lora` wrote (or :func:`load_lora_set` read back).

    Attributes:
        root: the ``lora`` folder.
        adapters: adapter folders by domain.
        base: the model they apply to (the experts' ``base``).
        info: the rest of ``lora.json`` (settings, seed, final losses, seconds).
    """

    root: Path
    adapters: dict[str, Path]
    base: Path
    info: dict[str, Any] = field(default_factory=dict)


def build_demo_lora(experts: ExpertSet | Path, *, settings: LoraSettings | None = None,
                    seed: int | None = None,
                    overwrite: bool = False, workers: int | None = None,
                    log: Callable[[str], None] | None = None) -> LoraSet:
    """Train one LoRA adapter per domain over ``experts.base`` into ``experts.root / "lora"``.

    Args:
        experts: a demo experts build (or its folder), from :func:`fusekit.demo.build_demo_experts`.
        settings: rank, alpha, learning rate and steps (default :class:`LoraSettings`).
        seed: seeds the adapters' initialisation and the crops; default: the experts' own seed, so
            each adapter sees the crops its full expert saw.
        overwrite: replace an existing ``lora`` folder.
        workers: adapters trained at once, each in its own single-threaded process; default one
            per CPU core (at most 3), 1 for a quick build. The result does not depend on it.
        log: called with one progress line per stage.

    Returns:
        The :class:`LoraSet` written (atomically) to ``experts.root / "lora"``.

    Raises:
        FusekitError: ``experts`` has no base, peft is missing, or the output exists.

    Example:
        >>> adapters = build_demo_lora(Path("demo-out/experts"))  # doctest: +SKIP
        >>> adapters.adapters["python"]  # doctest: +SKIP
    """
    from fusekit.lm.load import import_peft

    import_peft()
    expert_set = experts if isinstance(experts, ExpertSet) else load_expert_set(experts)
    if expert_set.base is None:
        raise FusekitError(f"{expert_set.root}: experts.json names no base model; rebuild the experts")
    say = log or (lambda _line: None)
    settings = settings or LoraSettings()
    sizes = BuildSizes(**expert_set.info["sizes"])
    seed = expert_set.info.get("seed", 0) if seed is None else seed
    workers = workers or (1 if expert_set.info.get("quick") else min(len(DOMAINS), os.cpu_count() or 1))
    started = time.perf_counter()
    with atomic_output(expert_set.root / "lora", overwrite=overwrite) as temp:
        jobs = _jobs(expert_set, sizes, settings, seed, temp)
        say(f"training {len(jobs)} LoRA adapters (rank {settings.rank}, {jobs[0].steps} steps each) "
            f"over {expert_set.base}, {workers} at a time")
        train = functools.partial(train_lora, settings=settings, base=str(expert_set.base.resolve()))
        results = dict(run_jobs(jobs, workers, train))
        for name, (loss, seconds) in results.items():
            say(f"lora {name}: final loss {loss:.3f} nats/token, {seconds:.0f} s")
        manifest = {"adapters": {d: d for d in DOMAINS}, "base": str(expert_set.base.resolve()),
                    "seed": seed, "settings": dataclasses.asdict(settings), "targets": list(LORA_TARGETS),
                    "final_loss": {d: results[d][0] for d in DOMAINS},
                    "seconds": round(time.perf_counter() - started, 1)}
        (temp / LORA_JSON).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    say(f"built {len(DOMAINS)} LoRA adapters in {time.perf_counter() - started:.0f} s")
    return load_lora_set(expert_set.root / "lora")


def _jobs(experts: ExpertSet, sizes: BuildSizes, settings: LoraSettings, seed: int,
          temp: Path) -> list[TrainingJob]:
    """One training job per domain: the full expert's crops, the adapter's learning rate and steps."""
    import tokenizers

    assert experts.base is not None
    tokenizer = tokenizers.Tokenizer.from_file(str(experts.base / "tokenizer.json"))
    corpora = {d: split_documents(SOURCES[d](sizes.doc_bytes), sizes, d) for d in DOMAINS}
    streams = {d: token_stream(tokenizer, corpora[d].train) for d in DOMAINS}
    lora_sizes = dataclasses.replace(sizes, lr=settings.lr)
    steps = settings.steps or sizes.steps
    vocab = tokenizer.get_vocab_size()
    return [TrainingJob(d, domain_mixture(d), streams, lora_sizes, steps, vocab, seed, temp / d, experts.base)
            for d in DOMAINS]


def train_lora(job: TrainingJob, *, settings: LoraSettings, base: str) -> tuple[float, float]:
    """Train a LoRA adapter on ``job.init`` (the base) and save it (PEFT's layout) in ``job.folder``,
    its config naming ``base`` as ``base_model_name_or_path``.

    Returns:
        (mean loss of the last tenth of the steps, seconds taken).
    """
    from fusekit.lm.load import import_peft, import_transformers

    started = time.perf_counter()
    torch.set_num_threads(1)
    peft = import_peft()
    model = import_transformers().LlamaForCausalLM.from_pretrained(job.init, dtype=torch.float32)
    config = peft.LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                             target_modules=list(LORA_TARGETS))
    torch.manual_seed(derive_seed(job.seed, job.name, "lora-init"))
    lora = peft.get_peft_model(model, config)
    losses = fit(lora, job, [p for p in lora.parameters() if p.requires_grad])
    lora.peft_config["default"].base_model_name_or_path = base
    lora.save_pretrained(job.folder, save_embedding_layers=False)  # none trained; no lookup of the base
    return tail_loss(losses), time.perf_counter() - started


def load_lora_set(root: Path) -> LoraSet:
    """Read ``root/lora.json`` (a folder :func:`build_demo_lora` wrote) back into a :class:`LoraSet`.

    Raises:
        FusekitError: ``root`` holds no readable ``lora.json``.
    """
    root = Path(root).absolute()
    try:
        manifest = json.loads((root / LORA_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FusekitError(f"{root} holds no readable {LORA_JSON}; build it with "
                           "scripts/make_demo_experts.py --lora") from None
    info = {k: v for k, v in manifest.items() if k not in ("adapters", "base")}
    return LoraSet(root, {d: root / path for d, path in manifest["adapters"].items()}, Path(manifest["base"]),
                   info)


def evaluate_lora(experts: ExpertSet, adapters: LoraSet, *,
                  device: str = "cpu") -> dict[str, dict[str, float]]:
    """Bits per byte on every held-out file of the base, each full expert and each adapter (applied to
    the base by :func:`fusekit.lm.load_lm`).

    Returns:
        ``table[row][held-out name]``; rows ``base``, then ``<domain>`` (full fine-tune) and
        ``<domain> lora`` for each domain.
    """
    from fusekit.lm.load import load_lm
    from fusekit.lm.score import read_text_file, score_text

    texts = {name: read_text_file(path) for name, path in experts.heldout.items()}
    rows: dict[str, Path | str] = {"base": adapters.base}
    for domain, folder in adapters.adapters.items():
        rows[domain] = experts.experts[domain].path
        rows[f"{domain} lora"] = folder
    table: dict[str, dict[str, float]] = {}
    for row, ref in rows.items():
        lm = load_lm(ref, device=device)
        table[row] = {t: score_text(lm, text).bits_per_byte for t, text in texts.items()}
    return table
