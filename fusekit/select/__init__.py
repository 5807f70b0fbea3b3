"""Expert selection and learned ensemble weights over a library of experts.

- :mod:`~fusekit.select.mixture`: every member's per-token log-probabilities of a data set (one
  scoring pass per member, cached), the bits per byte of any weighted mixture, learned weights.
- :mod:`~fusekit.select.greedy`: greedy forward selection of k experts on bits per byte.
- :mod:`~fusekit.select.cluster`: cosine similarity of the experts' ΔW (from LoRA factors without
  forming ΔW) and average-linkage clustering, with one representative or one merge per cluster.

Needs the ``lm`` extra (transformers) to score; nothing on the plain merge path imports it.
"""

from fusekit.select.mixture import (
    TokenLogprobs,
    learn_weights,
    member_token_logprobs,
    mixture_bpb,
)

__all__ = ["TokenLogprobs", "learn_weights", "member_token_logprobs", "mixture_bpb"]
