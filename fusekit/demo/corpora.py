"""The demo experts' text: documents of three domains read from files every Linux machine with
Python 3 has, split by document into four disjoint groups, and the router prompts cut from them.

- ``python``: the running interpreter's standard library (``sysconfig.get_paths()["stdlib"]``);
- ``c``: C headers from ``/usr/include``, topped up with Python's own include folder;
- ``prose``: English text: ``/usr/share/common-licenses``, README and copyright files under
  ``/usr/share/doc``, Python's ``LICENSE.txt`` and the standard library's long docstrings.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import sysconfig
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fusekit.demo.settings import DOMAINS, BuildSizes
from fusekit.errors import FusekitError


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


SOURCES: dict[str, Callable[[int], Iterator[str]]] = {
    "python": _python_documents, "c": _c_documents, "prose": _prose_documents}


@dataclass
class Corpus:
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


def split_documents(documents: Iterable[str], sizes: BuildSizes, domain: str) -> Corpus:
    """Split distinct documents into the four groups of :class:`Corpus`, by document, in order."""
    quota = {"train": sizes.train_bytes, "heldout": sizes.heldout_bytes, "router": sizes.router_bytes,
             "pool": sizes.pool_bytes}
    filled = dict.fromkeys(quota, 0)
    corpus = Corpus([], [], [], [])
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


def pick_examples(documents: Sequence[str], count: int, size: int, exclude: Iterable[str] = (),
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


def write_router_data(data_dir: Path, corpora: dict[str, Corpus], sizes: BuildSizes, quick: bool) -> None:
    """``train.jsonl`` and ``test.jsonl``: router prompts from documents no expert trained on, none
    occurring in the training text, with their domain and source document (``group``, which keeps a
    document's pieces in one cross-validation fold)."""
    example_size = 300 if not quick else 150
    trained = "\n".join(doc for c in corpora.values() for doc in c.train)
    splits = {"train": {d: pick_examples(corpora[d].router, sizes.train_examples, example_size,
                                         unseen=trained) for d in DOMAINS}}
    seen = [text for rows in splits["train"].values() for text, _ in rows]
    splits["test"] = {d: pick_examples(corpora[d].pool, sizes.test_examples, example_size, seen,
                                       unseen=trained) for d in DOMAINS}
    for split, rows in splits.items():
        _write_jsonl(data_dir / f"{split}.jsonl", ({"text": text, "domain": d, "group": f"{d}/{split}/{doc}"}
                                                    for d in DOMAINS for text, doc in rows[d]))


def mixed_text(heldout: dict[str, str], size: int, block: int) -> str:
    """Equal parts of each domain, alternating in blocks of about ``block`` characters."""
    blocks = {d: _chunks(text[:text.rfind("\n", 0, size) + 1], block) for d, text in heldout.items()}
    out: list[str] = []
    for i in range(max(len(b) for b in blocks.values())):
        out.extend(blocks[d][i] for d in DOMAINS if i < len(blocks[d]))
    return "".join(out)


def _write_jsonl(path: Path, rows: Iterable[dict[str, str]]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")

