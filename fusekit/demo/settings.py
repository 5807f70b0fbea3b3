"""What a demo experts build is made of: its domains and its :class:`BuildSizes` (``FULL``, ``QUICK``)."""

from __future__ import annotations

from dataclasses import dataclass

DOMAINS: tuple[str, ...] = ("python", "c", "prose")


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

