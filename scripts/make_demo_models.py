"""Build small local Llama checkpoints (a base and its fine-tunes) to try fusekit on.

Usage:
    python scripts/make_demo_models.py OUT_DIR [--hidden-size N] [--layers N] [--vocab-size N]
        [--dtype float32|bfloat16|float16] [--tie-word-embeddings] [--max-shard-size BYTES]
        [--names base math code] [--seed N]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fusekit.demo import build_demo_models

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="parent folder; one sub-folder per model")
    parser.add_argument(
        "--names",
        nargs="+",
        default=["base", "math", "code"],
        help="model names; the first is the base, the others fine-tunes of it",
    )
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=4, help="number of decoder layers")
    parser.add_argument(
        "--intermediate-size",
        type=int,
        default=None,
        help="MLP width (default: 8/3 of the hidden size, rounded up to 32)",
    )
    parser.add_argument("--heads", type=int, default=4, help="number of attention heads")
    parser.add_argument("--kv-heads", type=int, default=2, help="number of key/value heads")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="embedding rows (default: the built-in tokenizer's vocabulary)",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--tie-word-embeddings", action="store_true")
    parser.add_argument(
        "--max-shard-size",
        type=int,
        default=None,
        metavar="BYTES",
        help="split weights into safetensors shards of at most this many bytes",
    )
    parser.add_argument("--no-tokenizer", action="store_true", help="write no tokenizer files")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def _weights_summary(folder: Path) -> tuple[int, int]:
    """Parameter count and total bytes of a folder's safetensors files, read from their headers."""
    params = size = 0
    for path in sorted(folder.glob("model*.safetensors")):
        with path.open("rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        header.pop("__metadata__", None)
        params += sum(math.prod(entry["shape"]) for entry in header.values())
        size += path.stat().st_size
    return params, size


def main(argv: Sequence[str] | None = None) -> int:
    """Build the demo models and print one line per model: name, folder, parameters, bytes."""
    args = _parse_args(argv)
    try:
        folders = build_demo_models(
            args.out_dir,
            names=args.names,
            hidden_size=args.hidden_size,
            num_layers=args.layers,
            intermediate_size=args.intermediate_size,
            num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads,
            vocab_size=args.vocab_size,
            dtype=_DTYPES[args.dtype],
            tie_word_embeddings=args.tie_word_embeddings,
            max_shard_bytes=args.max_shard_size,
            with_tokenizer=not args.no_tokenizer,
            seed=args.seed,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for name, folder in folders.items():
        params, size = _weights_summary(folder)
        print(f"{name}\t{folder}\t{params:,} parameters\t{size:,} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
