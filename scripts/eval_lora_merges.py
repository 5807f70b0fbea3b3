"""Measure merges of the demo LoRA experts (issue 16's "Must show" table): bits per byte on held-out text.

Rows: the demo ``base``; each LoRA adapter applied to it (a ``base+adapter`` reference); the
adapter-space merges of the three adapters shipped in ``configs/lora/`` (``linear``, ``svd`` at ranks
8 and 24, ``ties_svd``; each writes an adapter, scored on the base); a full-rank ``ties`` merge of the
adapters' ΔW (``configs/lora/ties-full.yaml``, a full model); and a uniform linear merge of the three
FULL fine-tunes (``configs/lora/full-linear.yaml``). Columns: held-out mixed text, then each domain's.

The recipes name ``demo-out/experts/...`` as every shipped config does; this script copies them into
its work folder with that prefix replaced by ``--experts``, merges each with :func:`fusekit.merge`
and scores every row with fusekit's scorer (:func:`fusekit.lm.score.score_texts`), so the numbers are
the ones ``fusekit score`` prints.

Usage: python scripts/eval_lora_merges.py [--experts demo-out/experts] [--workdir DIR] [--json]
(--experts must hold the full demo experts and their adapters: ``python scripts/make_demo_experts.py
demo-out/experts --lora``; needs the 'lm' and 'lora' extras.)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "configs" / "lora"
PREFIX = "demo-out/experts"  # what the shipped recipes call the experts folder
ADAPTERS = ("python", "c", "prose")
# (row label, recipe in configs/lora/): adapter-space merges first, then full-model merges.
MERGES = (
    ("linear (adapter space, rank 8)", "linear.yaml"),
    ("svd, rank 8", "svd-r8.yaml"),
    ("svd, rank 24", "svd-r24.yaml"),
    ("ties_svd, rank 8", "ties_svd.yaml"),
    ("ties, full rank over ΔW", "ties-full.yaml"),
    ("linear of the FULL fine-tunes", "full-linear.yaml"),
)


@dataclass(frozen=True)
class Row:
    """One model to score: its label in the table and the reference ``load_lm`` takes."""

    label: str
    ref: str


def _recipe_copy(name: str, experts: Path, workdir: Path) -> Path:
    """``configs/lora/<name>`` with its ``demo-out/experts`` paths pointing at ``experts``."""
    text = (CONFIGS / name).read_text(encoding="utf-8").replace(PREFIX, experts.as_posix())
    path = workdir / "recipes" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def build_merges(experts: Path, workdir: Path) -> list[Row]:
    """Run every recipe in :data:`MERGES`; an adapter output is scored as ``base+adapter``."""
    import fusekit
    from fusekit.recipe import load_merge_recipe

    rows = []
    for label, name in MERGES:
        recipe = _recipe_copy(name, experts, workdir)
        out = workdir / "out" / Path(name).stem
        start = time.perf_counter()
        fusekit.merge(recipe, out, overwrite=True)
        print(f"merged {name} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        is_adapter = load_merge_recipe(recipe)[0].output == "adapter"
        rows.append(Row(label, f"{experts / 'base'}+{out}" if is_adapter else str(out)))
    return rows


def reference_rows(experts: Path) -> list[Row]:
    """The base and each adapter applied to it."""
    rows = [Row("base", str(experts / "base"))]
    rows += [Row(f"base + {name} adapter", f"{experts / 'base'}+{experts / 'lora' / name}")
             for name in ADAPTERS]
    return rows


def score_rows(rows: list[Row], texts: dict[str, str]) -> dict[str, dict[str, float]]:
    """Bits per byte of each row on each text, by label then text name."""
    from fusekit.lm.load import load_lm
    from fusekit.lm.score import score_texts

    table = {}
    for row in rows:
        lm = load_lm(row.ref)
        scores = score_texts(lm, list(texts.values()))
        table[row.label] = {name: s.bits_per_byte for name, s in zip(texts, scores, strict=True)}
        del lm
    return table


def markdown(table: dict[str, dict[str, float]], columns: list[str]) -> str:
    """The table as markdown, with each row's change on mixed text against the base."""
    base = table["base"]["mixed"]
    lines = ["| model | " + " | ".join(f"{c} bpb" for c in columns) + " | Δ mixed vs base |",
             "|---|" + "---:|" * (len(columns) + 1)]
    for label, values in table.items():
        cells = " | ".join(f"{values[c]:.4f}" for c in columns)
        lines.append(f"| {label} | {cells} | {values['mixed'] - base:+.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Build the merges, score every row, print the markdown table (or JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=Path, default=ROOT / "demo-out" / "experts")
    parser.add_argument("--workdir", type=Path, default=None, help="keep the merges here (default: a "
                        "temporary folder, removed afterwards)")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    from fusekit.demo import load_expert_set
    from fusekit.lm.score import read_text_file

    experts = args.experts.resolve()
    heldout = load_expert_set(experts).heldout
    columns = ["mixed", *[d for d in ADAPTERS if d in heldout]]
    texts = {c: read_text_file(heldout[c]) for c in columns}
    with tempfile.TemporaryDirectory(prefix="fusekit-lora-eval-") as tmp:
        workdir = args.workdir.resolve() if args.workdir else Path(tmp)
        rows = reference_rows(experts) + build_merges(experts, workdir)
        table = score_rows(rows, texts)
    print(json.dumps(table, indent=2) if args.json else markdown(table, columns))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
