"""``fusekit ensemble learn-weights``: member weights of a ``prob_avg`` recipe fitted on a data file.

Example:
    >>> result = learn_recipe_weights("configs/ensemble/prob_avg.yaml", texts)  # doctest: +SKIP
    >>> result.after_bpb <= result.before_bpb  # doctest: +SKIP
    True
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusekit.errors import FusekitError
from fusekit.select.mixture import learn_weights, member_token_logprobs, mixture_bpb
from fusekit.select.recipes import learned_recipe_text


@dataclass(frozen=True)
class LearnedWeights:
    """Weights before and after learning, and the mixture's bits per byte with each.

    Attributes:
        refs: the members, in recipe order.
        before / after: normalised weights (``after``: as written; members left out have 0).
        before_bpb / after_bpb: bits per byte of the data under each weighting.
        n_bytes: bytes of the data.
        recipe_text: the recipe with the learned weights, as YAML.
    """

    refs: list[str]
    before: list[float]
    after: list[float]
    before_bpb: float
    after_bpb: float
    n_bytes: int
    recipe_text: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready report (without the recipe text)."""
        return {"members": [{"model": r, "before": b, "after": a}
                            for r, b, a in zip(self.refs, self.before, self.after, strict=True)],
                "bits_per_byte_before": self.before_bpb, "bits_per_byte_after": self.after_bpb,
                "bytes": self.n_bytes}


def learn_recipe_weights(recipe_path: str | Path, texts: Sequence[str], *, device: str = "cpu",
                         use_cache: bool = True, steps: int = 500, batch_size: int = 8) -> LearnedWeights:
    """Fit the member weights of a ``prob_avg`` ensemble recipe to ``texts``.

    Args:
        recipe_path: an ensemble recipe whose method is ``prob_avg`` (no ``gate``), members sharing
            one tokenizer.
        texts: the data.
        device: where members are scored.
        use_cache: read and save per-token log-probabilities in the score cache.
        steps: most optimiser steps (see :func:`~fusekit.select.mixture.learn_weights`).
        batch_size: windows per forward pass.

    Returns:
        The :class:`LearnedWeights`, with the new recipe's text.

    Raises:
        RecipeError / FusekitError: an invalid recipe, another method, a gate, members with
            different tokenizers.
    """
    from fusekit.ensemble.recipe import load_ensemble_recipe

    recipe, _ = load_ensemble_recipe(recipe_path)
    if recipe.method != "prob_avg":
        raise FusekitError(f"{recipe_path}: method {recipe.method}; learned weights are the weights of a "
                           "probability mixture, so set method: prob_avg")
    if recipe.params().gate is not None:
        raise FusekitError(f"{recipe_path}: parameters.gate mixes only where the primary is unsure, which "
                           "these weights do not model; remove the gate to learn weights")
    refs = recipe.refs()
    lp = member_token_logprobs(refs, texts, device=device, dtype=recipe.dtype, use_cache=use_cache,
                               batch_size=batch_size)
    before = recipe.weights()
    learned = learn_weights(lp, steps=steps)
    comment = f"member weights learned by fusekit ensemble learn-weights from {recipe_path}"
    text, written = learned_recipe_text(recipe, learned, comment=comment)
    return LearnedWeights(refs, before, written, mixture_bpb(lp, before), mixture_bpb(lp, written),
                          lp.n_bytes, text)
