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

Output layout (``build_demo_experts(out)``)::

    out/experts.json               names, tokenizers, domains, paths (relative to out/)
    out/{python,c,prose,prose-b,base}/  config.json, model.safetensors, tokenizer files
    out/heldout/{python,c,prose,mixed}.txt
    out/data/{train,test}.jsonl    {"text": ..., "domain": ..., "group": ...} prompts for routers

Everything is deterministic given the seed (and the files on the machine).
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import math
import multiprocessing
import os
import sysconfig
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusekit.errors import FusekitError
from fusekit.io.writer import atomic_output

DOMAINS: tuple[str, ...] = ("python", "c", "prose")
SPECIAL_TOKENS: tuple[str, ...] = ("<unk>", "<s>", "</s>", "<pad>")
EXPERTS_JSON = "experts.json"
_OWN_SHARE = 0.85  # share of each expert's training crops taken from its own domain


@dataclass(frozen=True)
class BuildSizes:
    """How much text, how big a model and how long a training run.

    Attributes:
        train_bytes / heldout_bytes: text per domain for training / for ``heldout/<domain>.txt``.
        pool_bytes: held-out text per domain from which ``data/test.jsonl`` is drawn.
        router_bytes: held-out text per domain from which ``data/train.jsonl`` is drawn.
        doc_bytes: longest piece taken from one file.
        vocab_a / vocab_b: tokenizer sizes.
        hidden / layers / heads / intermediate / context: the Llama configuration.
        base_steps: optimiser steps of the shared base (all domains, tokenizer A).
        steps / batch / seq: further steps of each expert, crops per step, tokens per crop.
        lr: peak learning rate (linear warm-up, cosine decay to 10%).
        train_examples / test_examples: router prompts per domain.
    """

    train_bytes: int
    heldout_bytes: int
    pool_bytes: int
    doc_bytes: int
    vocab_a: int
    vocab_b: int
    hidden: int
    layers: int
    heads: int
    intermediate: int
    context: int
    base_steps: int
    steps: int
    batch: int
    seq: int
    lr: float
    train_examples: int
    test_examples: int
    router_bytes: int = 250_000


FULL = BuildSizes(train_bytes=600_000, heldout_bytes=24_000, pool_bytes=100_000, doc_bytes=16_000,
                  vocab_a=2048, vocab_b=1536, hidden=96, layers=3, heads=4, intermediate=256,
                  context=256, base_steps=200, steps=250, batch=16, seq=128, lr=3e-3,
                  train_examples=500, test_examples=200, router_bytes=250_000)
QUICK = BuildSizes(train_bytes=40_000, heldout_bytes=3_000, pool_bytes=6_000, doc_bytes=4_000,
                   vocab_a=320, vocab_b=300, hidden=32, layers=2, heads=4, intermediate=64,
                   context=64, base_steps=2, steps=4, batch=4, seq=32, lr=3e-3, train_examples=20,
                   test_examples=10, router_bytes=8_000)


@dataclass(frozen=True)
class Expert:
    """One trained demo expert: ``path`` is its model folder; ``tokenizer`` is ``A`` or ``B``."""

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


# --- corpora ------------------------------------------------------------------------------------


def _read(path: Path, limit: int) -> str:
    """Text of ``path`` (gzip-aware), cut at a line end before ``limit`` characters; '' if unusable."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
        return ""
    text = text.replace("\r\n", "\n").replace("\x0c", "")
    if "\x00" in text:
        return ""
    if len(text) > limit:
        cut = text.rfind("\n", 0, limit)
        text = text[:cut + 1 if cut > 0 else limit]
    return text


def _spread(items: Sequence[Path], count: int) -> list[Path]:
    """Up to ``count`` items evenly spaced over the sorted ``items`` (all of them when fewer)."""
    if len(items) <= count:
        return list(items)
    step = len(items) / count
    return [items[int(i * step)] for i in range(count)]


def _files(root: Path, pattern: str) -> list[Path]:
    if not root.is_dir():
        return []
    return sorted(p for p in root.rglob(pattern) if p.is_file() and not p.is_symlink())


def _python_documents(doc_bytes: int) -> Iterator[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(stdlib.glob("*.py")) + _spread(
        [p for p in _files(stdlib, "*.py") if p.parent != stdlib and "test" not in p.parts
         and "site-packages" not in p.parts], 400)
    for path in files:
        yield _read(path, doc_bytes)


def _c_documents(doc_bytes: int) -> Iterator[str]:
    include = Path(sysconfig.get_paths()["include"])
    yield from (_read(p, doc_bytes) for p in _spread(_files(Path("/usr/include"), "*.h"), 600))
    yield from (_read(p, doc_bytes) for p in _files(include, "*.h"))


def _docstrings(path: Path) -> str:
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return ""
    nodes = [tree, *(n for n in ast.walk(tree)
                     if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)))]
    parts = [doc for n in nodes if (doc := ast.get_docstring(n)) and len(doc) >= 200]
    return "\n\n".join(parts) + "\n" if parts else ""


def _interleave(*sources: Iterable[str]) -> Iterator[str]:
    iterators = [iter(s) for s in sources]
    while iterators:
        for it in list(iterators):
            try:
                yield next(it)
            except StopIteration:
                iterators.remove(it)


def _prose_documents(doc_bytes: int) -> Iterator[str]:
    paths = sysconfig.get_paths()
    licenses = [p for p in sorted(Path("/usr/share/common-licenses").glob("*")) if p.is_file()]
    docs = _spread([p for p in _files(Path("/usr/share/doc"), "*")
                    if p.name.split(".")[0] in ("README", "copyright")], 300)
    stdlib = Path(paths["stdlib"])
    python_docs = [stdlib / "LICENSE.txt", *sorted(stdlib.glob("*.py"))]
    yield from _interleave(
        (_read(p, doc_bytes) for p in licenses),
        (_read(p, doc_bytes) for p in docs),
        (_read(p, doc_bytes) if p.suffix == ".txt" else _docstrings(p)[:doc_bytes] for p in python_docs))


_SOURCES: dict[str, Callable[[int], Iterator[str]]] = {
    "python": _python_documents, "c": _c_documents, "prose": _prose_documents}


@dataclass
class _Corpus:
    """One domain's documents in four disjoint groups (no document is in two of them)."""

    train: list[str]  # the experts' training text
    heldout: list[str]  # heldout/<domain>.txt
    router: list[str]  # data/train.jsonl prompts
    pool: list[str]  # data/test.jsonl prompts

    @property
    def heldout_text(self) -> str:
        return "".join(self.heldout)


# Which group the i-th distinct document goes to (i % 8) while that group still needs text:
# half of the documents train, a quarter feed the router's training prompts, an eighth each the
# held-out text and the router's test prompts. A document whose group is full trains (or, once
# the training text is full too, goes to the first group that still needs text). A held-out
# document keeps only a piece from its middle, 1/128 of the group's size (at least 600 characters),
# so held-out text and prompts sample many files rather than a few long ones (and not just their
# licence headers); the rest of it is not used anywhere.
_GROUP_OF_SLOT = ("pool", "train", "router", "train", "heldout", "train", "router", "train")


def _middle(text: str, limit: int) -> str:
    """About ``limit`` characters of whole lines from the middle of ``text`` (all of a shorter one)."""
    if len(text) <= limit:
        return text
    start = text.rfind("\n", 0, (len(text) - limit) // 2) + 1
    cut = text.rfind("\n", start, start + limit)
    return text[start:cut + 1 if cut > start else start + limit]


def _split(documents: Iterable[str], sizes: BuildSizes, domain: str) -> _Corpus:
    """Split distinct documents into the four groups of :class:`_Corpus`, by document, in order."""
    quota = {"train": sizes.train_bytes, "heldout": sizes.heldout_bytes, "router": sizes.router_bytes,
             "pool": sizes.pool_bytes}
    filled = dict.fromkeys(quota, 0)
    corpus = _Corpus([], [], [], [])
    seen: set[str] = set()
    for doc in documents:
        if len(doc.strip()) < 200:
            continue
        digest = hashlib.sha256(doc.encode()).hexdigest()
        if digest in seen:
            continue
        group = _GROUP_OF_SLOT[len(seen) % len(_GROUP_OF_SLOT)]
        seen.add(digest)
        if filled[group] >= quota[group]:
            group = next((g for g in ("train", "heldout", "pool", "router") if filled[g] < quota[g]), "")
            if not group:
                break
        if group != "train":
            doc = _middle(doc, max(quota[group] // 128, 600))
        getattr(corpus, group).append(doc)
        filled[group] += len(doc)
    short = [g for g in quota if filled[g] < quota[g] // (4 if g == "train" else 2)]
    if short:
        raise FusekitError(f"demo experts: found only {sum(filled.values())} bytes of {domain} text "
                           "on this machine; the demo needs the Python standard library and /usr/include "
                           "or Python's C headers")
    return corpus


def _chunks(text: str, size: int) -> list[str]:
    """``text`` cut at line ends into pieces of about ``size`` characters (short ones dropped)."""
    pieces, start = [], 0
    while start < len(text):
        cut = text.find("\n", start + size)
        end = len(text) if cut < 0 else cut + 1
        piece = text[start:end]
        if len(piece.strip()) >= size // 3:
            pieces.append(piece)
        start = end
    return pieces


def _examples(documents: Sequence[str], count: int, size: int, exclude: Iterable[str] = (),
              unseen: str = "") -> list[tuple[str, int]]:
    """``count`` distinct pieces spread evenly over the documents' chunks, none equal to one in
    ``exclude`` nor occurring in ``unseen`` (licence boilerplate repeats across files), each with
    the index of the document it was cut from."""
    excluded = set(exclude)
    first: dict[str, int] = {}  # piece -> the first document it occurs in
    for index, doc in enumerate(documents):
        for piece in _chunks(doc, size):
            if piece not in excluded and piece not in unseen:
                first.setdefault(piece, index)
    pieces = list(first.items())
    if len(pieces) <= count:
        return pieces
    step = len(pieces) / count
    return [pieces[int(i * step)] for i in range(count)]


def _write_router_data(data_dir: Path, corpora: dict[str, _Corpus], sizes: BuildSizes, quick: bool) -> None:
    """``train.jsonl`` and ``test.jsonl``: router prompts from documents no expert trained on, none
    occurring in the training text, with their domain and source document (``group``, which keeps a
    document's pieces in one cross-validation fold)."""
    example_size = 300 if not quick else 150
    trained = "\n".join(doc for c in corpora.values() for doc in c.train)
    splits = {"train": {d: _examples(corpora[d].router, sizes.train_examples, example_size, unseen=trained)
                        for d in DOMAINS}}
    seen = [text for rows in splits["train"].values() for text, _ in rows]
    splits["test"] = {d: _examples(corpora[d].pool, sizes.test_examples, example_size, seen, unseen=trained)
                      for d in DOMAINS}
    for split, rows in splits.items():
        _write_jsonl(data_dir / f"{split}.jsonl", ({"text": text, "domain": d, "group": f"{d}/{split}/{doc}"}
                                                   for d in DOMAINS for text, doc in rows[d]))


def _mixed(heldout: dict[str, str], size: int, block: int) -> str:
    """Equal parts of each domain, alternating in blocks of about ``block`` characters."""
    blocks = {d: _chunks(text[:text.rfind("\n", 0, size) + 1], block) for d, text in heldout.items()}
    out: list[str] = []
    for i in range(max(len(b) for b in blocks.values())):
        out.extend(blocks[d][i] for d in DOMAINS if i < len(blocks[d]))
    return "".join(out)


# --- tokenizers ---------------------------------------------------------------------------------


def _train_tokenizer(texts: Sequence[str], vocab_size: int) -> Any:
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    except ImportError:
        raise FusekitError("the demo experts need the tokenizers library; install fusekit with the "
                           "'lm' extra: pip install 'fusekit[lm]'") from None
    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False, min_frequency=2)
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    bos = SPECIAL_TOKENS[1]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))])
    return tokenizer


def _save_tokenizer(tokenizer: Any, folder: Path, context: int) -> None:
    from fusekit.lm.load import import_transformers

    fast = import_transformers().PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, unk_token=SPECIAL_TOKENS[0], bos_token=SPECIAL_TOKENS[1],
        eos_token=SPECIAL_TOKENS[2], pad_token=SPECIAL_TOKENS[3], model_max_length=context,
        clean_up_tokenization_spaces=False)
    fast.save_pretrained(folder)


def _token_stream(tokenizer: Any, documents: Sequence[str]) -> torch.Tensor:
    """All documents' tokens, each followed by ``</s>``, as one long tensor."""
    eos = tokenizer.token_to_id(SPECIAL_TOKENS[2])
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(list(documents), add_special_tokens=False):
        ids.extend(encoding.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


# --- models -------------------------------------------------------------------------------------


def _llama_config(sizes: BuildSizes, vocab_size: int) -> Any:
    from fusekit.lm.load import import_transformers

    return import_transformers().LlamaConfig(
        vocab_size=vocab_size, hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=sizes.layers, num_attention_heads=sizes.heads,
        num_key_value_heads=sizes.heads, max_position_embeddings=sizes.context, rms_norm_eps=1e-6,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=3)


def _seed(seed: int, *parts: str) -> int:
    digest = hashlib.sha256(":".join([str(seed), *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass(frozen=True)
class _Job:
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


def _run_jobs(jobs: Sequence[_Job], workers: int) -> Iterator[tuple[str, tuple[float, float]]]:
    """Run :func:`_train` on each job, in this process or in ``workers`` spawned ones."""
    if workers <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny matrices: one thread beats two, and is deterministic
        try:
            for job in sorted(jobs, key=lambda j: j.after is not None):
                yield job.name, _train(job)
        finally:
            torch.set_num_threads(threads)
        return
    context = multiprocessing.get_context("spawn")
    waiting = [j for j in jobs if j.after is not None]
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        running = {pool.submit(_train, j): j.name for j in jobs if j.after is None}
        while running:
            future = next(as_completed(running))
            name = running.pop(future)
            yield name, future.result()
            for job in [j for j in waiting if j.after == name]:
                waiting.remove(job)
                running[pool.submit(_train, job)] = job.name


def _train(job: _Job) -> tuple[float, float]:
    """Train one model on crops drawn from the domains by ``job.mixture``; save it in ``job.folder``.

    Returns:
        (mean loss of the last tenth of the steps, seconds taken).
    """
    from fusekit.lm.load import import_transformers

    started = time.perf_counter()
    torch.set_num_threads(1)
    transformers = import_transformers()
    sizes = job.sizes
    if job.init is None:
        torch.manual_seed(_seed(job.seed, job.name, "init"))
        model = transformers.LlamaForCausalLM(_llama_config(sizes, job.vocab_size))
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(job.init, dtype=torch.float32)
    model.train()
    gen = torch.Generator().manual_seed(_seed(job.seed, job.name, "data"))
    domains = list(job.mixture)
    weights = torch.tensor([job.mixture[d] for d in domains])
    optimizer = torch.optim.AdamW(model.parameters(), lr=sizes.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, job.steps // 15)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, job.steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    bos = 1
    losses: list[float] = []
    for _ in range(job.steps):
        picks = torch.multinomial(weights, sizes.batch, replacement=True, generator=gen)
        rows = []
        for pick in picks.tolist():
            stream = job.streams[domains[pick]]
            start = int(torch.randint(0, len(stream) - sizes.seq, (1,), generator=gen))
            rows.append(torch.cat([torch.tensor([bos]), stream[start:start + sizes.seq - 1]]))
        batch = torch.stack(rows)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    job.folder.mkdir(exist_ok=True)
    model.save_pretrained(job.folder)
    tail = losses[-max(1, len(losses) // 10):]
    return sum(tail) / len(tail), time.perf_counter() - started


def _mixture(domain: str | None) -> dict[str, float]:
    """Equal shares (the base), or ``_OWN_SHARE`` for ``domain`` and the rest split evenly."""
    if domain is None:
        return dict.fromkeys(DOMAINS, 1 / len(DOMAINS))
    rest = (1 - _OWN_SHARE) / (len(DOMAINS) - 1)
    return {d: _OWN_SHARE if d == domain else rest for d in DOMAINS}


# --- the builder --------------------------------------------------------------------------------


def _write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


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

    Example:
        >>> experts = build_demo_experts(Path("demo-out/experts"))
        >>> experts.experts["python"].path, experts.heldout["mixed"]
    """
    say = log or (lambda _line: None)
    sizes = sizes or (QUICK if quick else FULL)
    started = time.perf_counter()
    corpora = {d: _split(_SOURCES[d](sizes.doc_bytes), sizes, d) for d in DOMAINS}
    say("corpora (chars of training / held-out / router-train / router-test documents): " + ", ".join(
        f"{d} {sum(map(len, c.train)):,} / {len(c.heldout_text):,} / {sum(map(len, c.router)):,} / "
        f"{sum(map(len, c.pool)):,}" for d, c in corpora.items()))
    with atomic_output(Path(out), overwrite=overwrite) as temp:
        heldout_dir, data_dir = temp / "heldout", temp / "data"
        heldout_dir.mkdir()
        data_dir.mkdir()
        heldout = {d: c.heldout_text[:sizes.heldout_bytes] for d, c in corpora.items()}
        heldout = {d: text[:text.rfind("\n") + 1] or text for d, text in heldout.items()}
        heldout["mixed"] = _mixed(heldout, sizes.heldout_bytes // len(DOMAINS), 600)
        for name, text in heldout.items():
            (heldout_dir / f"{name}.txt").write_text(text, encoding="utf-8")
        _write_router_data(data_dir, corpora, sizes, quick)

        all_train = [doc for d in DOMAINS for doc in corpora[d].train]
        tokenizers = {"A": _train_tokenizer(all_train, sizes.vocab_a),
                      "B": _train_tokenizer(corpora["prose"].train, sizes.vocab_b)}
        say(f"tokenizers: A {tokenizers['A'].get_vocab_size()} tokens (all domains), "
            f"B {tokenizers['B'].get_vocab_size()} tokens (prose)")
        streams = {t: {d: _token_stream(tok, corpora[d].train) for d in DOMAINS}
                   for t, tok in tokenizers.items()}
        plan = [("python", "python", "A"), ("c", "c", "A"), ("prose", "prose", "A"),
                ("prose-b", "prose", "B")]
        vocab = {t: tok.get_vocab_size() for t, tok in tokenizers.items()}
        jobs = [_Job("base", _mixture(None), streams["A"], sizes, sizes.base_steps, vocab["A"], seed,
                     temp / "base")]
        for name, domain, tok in plan:  # A experts fine-tune the base; prose-b trains as long alone
            jobs.append(_Job(name, _mixture(domain), streams[tok], sizes,
                             sizes.steps if tok == "A" else sizes.base_steps + sizes.steps,
                             vocab[tok], seed, temp / name, *((temp / "base", "base") if tok == "A" else ())))
        losses: dict[str, float] = {}
        workers = workers or (1 if quick else min(len(plan), os.cpu_count() or 1))
        say(f"training a base ({sizes.base_steps} steps, all domains) and {len(plan)} experts "
            f"({sizes.steps} more steps each; prose-b {sizes.base_steps + sizes.steps} from scratch), "
            f"{workers} at a time")
        for name, (loss, seconds) in _run_jobs(jobs, workers):
            losses[name] = loss
            say(f"{name}: final loss {loss:.3f} nats/token, {seconds:.0f} s")
        _save_tokenizer(tokenizers["A"], temp / "base", sizes.context)
        experts: dict[str, Expert] = {}
        for name, domain, tok_name in plan:
            _save_tokenizer(tokenizers[tok_name], temp / name, sizes.context)
            experts[name] = Expert(name, domain, tok_name, Path(name))
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


def load_expert_set(root: Path) -> ExpertSet:
    """Read ``root/experts.json`` back into an :class:`ExpertSet` with absolute paths."""
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
    """Bits per byte of every expert on every held-out file: ``table[expert][heldout name]``."""
    from fusekit.lm.load import load_lm
    from fusekit.lm.score import read_text_file, score_text

    texts = {name: read_text_file(path) for name, path in experts.heldout.items()}
    table: dict[str, dict[str, float]] = {}
    for name, expert in experts.experts.items():
        lm = load_lm(expert.path, device=device)
        table[name] = {t: score_text(lm, text).bits_per_byte for t, text in texts.items()}
    return table
