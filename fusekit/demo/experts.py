"""Demo experts: small Llama models trained on CPU on kinds of text every Linux machine has.

Three domains, each read from files present wherever Python 3 runs:

- ``python``: the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``);
- ``c``: C headers from ``/usr/include``, topped up with Python's own include folder;
- ``prose``: English text: ``/usr/share/common-licenses``, README and copyright files under
  ``/usr/share/doc``, Python's ``LICENSE.txt`` and the standard library's long docstrings.

Documents are listed in sorted order and split by document into four disjoint groups: the experts'
training text, ``heldout/<domain>.txt``, a pool for the router training prompts
(``data/train.jsonl``) and a pool for the router test prompts (``data/test.jsonl``). No held-out
text and no router prompt (train or test) is trained on, so a router learns which expert
generalises best on a prompt, not which one memorised it. Two byte-level BPE tokenizers are trained
with the ``tokenizers`` library: ``A`` (2048 tokens, all three domains) and ``B`` (1536 tokens,
prose only). A ``base`` model learns all three domains with ``A``; the experts ``python``, ``c``
and ``prose`` are fine-tuned from it, mostly (85%) on their own domain, so they share one
configuration and can be merged with ``fusekit merge`` (``base`` as ``base_model``). ``prose-b``
uses ``B`` and trains from scratch for as many steps in all, so ensembles with it must align
vocabularies.

The text comes from :mod:`fusekit.demo.corpora`, the tokenizers from :mod:`fusekit.demo.tokenizer`,
the training runs from :mod:`fusekit.demo.training`. Output layout (``build_demo_experts(out)``)::

    out/experts.json               names, tokenizers, domains, paths (relative to out/)
    out/{python,c,prose,prose-b,base}/  config.json, model.safetensors, tokenizer files
    out/heldout/{python,c,prose,mixed}.txt
    out/data/{train,test}.jsonl    {"text": ..., "domain": ..., "group": ...} prompts for routers

Everything is deterministic given the seed (and the files on the machine).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusekit.demo.corpora import SOURCES, Corpus, mixed_text, split_documents, write_router_data
from fusekit.demo.settings import DOMAINS, FULL, QUICK, BuildSizes
from fusekit.demo.tokenizer import save_bpe_tokenizer, token_stream, train_bpe_tokenizer
from fusekit.demo.training import TrainingJob, domain_mixture, run_jobs
from fusekit.errors import FusekitError
from fusekit.io.writer import atomic_output
from fusekit.progress import bar, steps

EXPERTS_JSON = "experts.json"


@dataclass(frozen=True)
class Expert:
    """One trained demo expert.

    Attributes:
        name: ``python``, ``c``, ``prose`` or ``prose-b``.
        domain: the domain it was mostly trained on: ``python``, ``c`` or ``prose``.
        tokenizer: ``A`` (all domains, shared with the base) or ``B`` (prose only).
        path: its model folder (relative in ``experts.json``, absolute once loaded).
    """

    name: str
    domain: str
    tokenizer: str
    path: Path


@dataclass
class ExpertSet:
    """What :func:`build_demo_experts` wrote (or :func:`load_expert_set` read back).

    Attributes:
        root: the output folder.
        experts: by name: ``python``, ``c``, ``prose`` (tokenizer A), ``prose-b`` (tokenizer B).
        heldout: by domain (and ``mixed``): held-out text files.
        data: ``train`` and ``test`` JSONL prompt files (``{"text", "domain", "group"}`` per line).
        base: the model the tokenizer-A experts were fine-tuned from (a merge's ``base_model``).
        info: the rest of ``experts.json`` (sizes, seed, final training losses).
    """

    root: Path
    experts: dict[str, Expert]
    heldout: dict[str, Path]
    data: dict[str, Path]
    base: Path | None = None
    info: dict[str, Any] = field(default_factory=dict)


_PLAN = (("python", "python", "A"), ("c", "c", "A"), ("prose", "prose", "A"), ("prose-b", "prose", "B"))
"""Each expert's name, domain and tokenizer: ``A`` experts fine-tune the base, ``prose-b`` trains
alone for as many steps in all."""


def build_demo_experts(out: Path, *, quick: bool = False, seed: int = 0, overwrite: bool = False,
                       log: Callable[[str], None] | None = None,
                       sizes: BuildSizes | None = None, workers: int | None = None) -> ExpertSet:
    """Train the demo experts into ``out`` (written atomically) and describe them.

    Args:
        out: output folder (see the module docstring for its layout).
        quick: a few training steps of a much smaller model (seconds; for tests). The full build
            takes a few CPU minutes on 2 cores.
        seed: seeds model initialisation and the training crops.
        overwrite: replace an existing, non-empty ``out``.
        log: called with one progress line per stage (e.g. ``print`` to stderr).
        sizes: explicit sizes, overriding ``quick`` (e.g. ``dataclasses.replace(QUICK, steps=40)``).
        workers: experts trained at once, each in its own single-threaded process; default one
            per CPU core (at most 4), or 1 (in this process) for ``quick``. The result does not
            depend on it.

    Returns:
        The :class:`ExpertSet` written to ``out``.

    Raises:
        OutputExistsError: ``out`` is not empty and ``overwrite`` is not set.
        FusekitError: this machine lacks the text of a domain, or the ``tokenizers`` library.

    Example:
        >>> experts = build_demo_experts(Path("demo-out/experts"))  # doctest: +SKIP
        >>> experts.experts["python"].path, experts.heldout["mixed"]  # doctest: +SKIP
    """
    say = log or (lambda _line: None)
    sizes = sizes or (QUICK if quick else FULL)
    started = time.perf_counter()
    corpora = {d: split_documents(SOURCES[d](sizes.doc_bytes), sizes, d) for d in DOMAINS}
    say("corpora (chars of training / held-out / router-train / router-test documents): " + ", ".join(
        f"{d} {sum(map(len, c.train)):,} / {len(c.heldout_text):,} / {sum(map(len, c.router)):,} / "
        f"{sum(map(len, c.pool)):,}" for d, c in corpora.items()))
    with atomic_output(Path(out), overwrite=overwrite) as temp:
        heldout = _write_text_files(temp, corpora, sizes, quick)
        workers = workers or (1 if quick else min(len(_PLAN), os.cpu_count() or 1))
        losses = _train_all(temp, corpora, sizes, seed, workers, say)
        experts = {name: Expert(name, domain, tok, Path(name)) for name, domain, tok in _PLAN}
        info = {"seed": seed, "quick": quick, "sizes": vars(sizes),
                "final_loss": {name: losses[name] for name in ["base", *experts]}}
        manifest = {
            "experts": [{"name": e.name, "domain": e.domain, "tokenizer": e.tokenizer,
                         "path": str(e.path)} for e in experts.values()],
            "base": {"name": "base", "tokenizer": "A", "path": "base"},
            "heldout": {name: f"heldout/{name}.txt" for name in heldout},
            "data": {"train": "data/train.jsonl", "test": "data/test.jsonl"},
            **info,
        }
        (temp / EXPERTS_JSON).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    say(f"built {len(experts)} experts in {time.perf_counter() - started:.0f} s")
    return load_expert_set(out)


def _write_text_files(temp: Path, corpora: dict[str, Corpus], sizes: BuildSizes,
                      quick: bool) -> dict[str, str]:
    """``heldout/*.txt`` and ``data/*.jsonl`` in ``temp``; the held-out texts by name."""
    heldout_dir, data_dir = temp / "heldout", temp / "data"
    heldout_dir.mkdir()
    data_dir.mkdir()
    heldout = {d: c.heldout_text[:sizes.heldout_bytes] for d, c in corpora.items()}
    heldout = {d: text[:text.rfind("\n") + 1] or text for d, text in heldout.items()}
    heldout["mixed"] = mixed_text(heldout, sizes.heldout_bytes // len(DOMAINS), 600)
    for name, text in heldout.items():
        (heldout_dir / f"{name}.txt").write_text(text, encoding="utf-8")
    write_router_data(data_dir, corpora, sizes, quick)
    return heldout


def _train_all(temp: Path, corpora: dict[str, Corpus], sizes: BuildSizes, seed: int, workers: int,
               say: Callable[[str], None]) -> dict[str, float]:
    """Train both tokenizers, the base and every expert of :data:`_PLAN` into ``temp``; each model's
    final training loss."""
    all_train = [doc for d in DOMAINS for doc in corpora[d].train]
    tokenizers = {"A": train_bpe_tokenizer(all_train, sizes.vocab_a),
                  "B": train_bpe_tokenizer(corpora["prose"].train, sizes.vocab_b)}
    say(f"tokenizers: A {tokenizers['A'].get_vocab_size()} tokens (all domains), "
        f"B {tokenizers['B'].get_vocab_size()} tokens (prose)")
    streams = {t: {d: token_stream(tok, corpora[d].train) for d in DOMAINS} for t, tok in tokenizers.items()}
    vocab = {t: tok.get_vocab_size() for t, tok in tokenizers.items()}
    jobs = [TrainingJob("base", domain_mixture(None), streams["A"], sizes, sizes.base_steps, vocab["A"], seed,
                        temp / "base")]
    for name, domain, tok in _PLAN:
        jobs.append(TrainingJob(name, domain_mixture(domain), streams[tok], sizes,
                                sizes.steps if tok == "A" else sizes.base_steps + sizes.steps,
                                vocab[tok], seed, temp / name,
                                *((temp / "base", "base") if tok == "A" else ())))
    say(f"training a base ({sizes.base_steps} steps, all domains) and {len(_PLAN)} experts "
        f"({sizes.steps} more steps each; prose-b {sizes.base_steps + sizes.steps} from scratch), "
        f"{workers} at a time")
    losses: dict[str, float] = {}
    job_steps = {job.name: job.steps for job in jobs}
    with steps(f"training base + {len(_PLAN)} experts", total=sum(job_steps.values()),
               unit="step") as advance:
        for name, (loss, seconds) in run_jobs(jobs, workers):
            advance(job_steps[name])
            losses[name] = loss
            say(f"{name}: final loss {loss:.3f} nats/token, {seconds:.0f} s")
    for name, tok in [("base", "A"), *((name, tok) for name, _, tok in _PLAN)]:
        save_bpe_tokenizer(tokenizers[tok], temp / name, model_max_length=sizes.context)
    return losses


def load_expert_set(root: Path) -> ExpertSet:
    """Read ``root/experts.json`` back into an :class:`ExpertSet` with absolute paths.

    Args:
        root: a folder written by :func:`build_demo_experts`.

    Returns:
        The :class:`ExpertSet` it holds.

    Raises:
        FusekitError: ``root`` holds no readable ``experts.json``.
    """
    root = Path(root).absolute()
    try:
        manifest = json.loads((root / EXPERTS_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise FusekitError(f"{root} holds no readable {EXPERTS_JSON}; build it with "
                           "scripts/make_demo_experts.py") from None
    experts = {e["name"]: Expert(e["name"], e["domain"], e["tokenizer"], root / e["path"])
               for e in manifest["experts"]}
    info = {k: v for k, v in manifest.items() if k not in ("experts", "heldout", "data", "base")}
    base = root / manifest["base"]["path"] if "base" in manifest else None
    return ExpertSet(root, experts, {k: root / v for k, v in manifest["heldout"].items()},
                     {k: root / v for k, v in manifest["data"].items()}, base, info)


def evaluate_experts(experts: ExpertSet, *, device: str = "cpu") -> dict[str, dict[str, float]]:
    """Bits per byte of every expert on every held-out file (needs the ``lm`` extra).

    Args:
        experts: what :func:`build_demo_experts` or :func:`load_expert_set` returned.
        device: where the experts run (``cpu``, ``cuda``, ``auto``).

    Returns:
        ``table[expert name][held-out name]``: bits per byte, lower is better.
    """
    from fusekit.lm.load import load_lm
    from fusekit.lm.score import read_text_file, score_text

    texts = {name: read_text_file(path) for name, path in experts.heldout.items()}
    table: dict[str, dict[str, float]] = {}
    for name, expert in bar(experts.experts.items(), desc=f"scoring {len(texts)} held-out texts",
                            total=len(experts.experts), unit="expert"):
        lm = load_lm(expert.path, device=device)
        table[name] = {t: score_text(lm, text).bits_per_byte for t, text in texts.items()}
    return table
