"""Recipes that use a chosen subset of experts, learned weights written into an ensemble recipe, and
the uniform linear merges that ``--objective merge`` and ``--merge-clusters`` build.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from fusekit.io.refs import resolve_model

MIN_WEIGHT = 1e-6
"""Learned weights below this are dropped from the written recipe (a recipe weight must be > 0)."""


def full_rank_ref(ref: str, *, base: str | None = None) -> str:
    """``ref`` as a merge recipe's full-rank model: an adapter folder becomes ``base+adapter``."""
    resolved = resolve_model(ref, base=base)
    if resolved.adapter is None or "+" in ref:
        return ref
    return f"{base or resolved.base_ref}+{ref}"


def ensemble_recipe_text(refs: Sequence[str], *, comment: str, weights: Sequence[float] | None = None) -> str:
    """A ``prob_avg`` ensemble recipe over ``refs`` (uniform unless ``weights``)."""
    models: list[dict[str, Any]] = [{"model": r} for r in refs]
    if weights is not None:
        for entry, w in zip(models, weights, strict=True):
            entry["weight"] = float(w)
    return _with_comment(comment, {"models": models, "method": "prob_avg"})


def merge_recipe_text(refs: Sequence[str], *, comment: str, base: str | None = None) -> str:
    """A uniform ``linear`` merge recipe over ``refs`` (adapters as ``base+adapter``, full rank)."""
    models = [{"model": full_rank_ref(r, base=base), "parameters": {"weight": 1.0}} for r in refs]
    return _with_comment(comment, {"merge_method": "linear", "models": models, "dtype": "float32"})


def _with_comment(comment: str, payload: dict[str, Any]) -> str:
    lines = "".join(f"# {line}\n" for line in comment.splitlines())
    return lines + yaml.safe_dump(payload, sort_keys=False, allow_unicode=True)


def learned_recipe_text(recipe: Any, weights: Sequence[float], *, comment: str) -> tuple[str, list[float]]:
    """``recipe`` (an :class:`~fusekit.ensemble.recipe.EnsembleRecipe`) with ``weights``; members whose
    weight is below :data:`MIN_WEIGHT` are left out (and ``primary`` renumbered).

    Returns:
        The YAML text and the weights it gives every original member (0 for those left out).
    """
    kept = [i for i, w in enumerate(weights) if w >= MIN_WEIGHT]
    total = sum(weights[i] for i in kept)
    written = [weights[i] / total if i in kept else 0.0 for i in range(len(weights))]
    payload = recipe.model_dump(mode="json", exclude_unset=True)
    models = []
    for i in kept:
        entry = {k: v for k, v in payload["models"][i].items() if k not in ("weight", "parameters")}
        models.append({**entry, "weight": written[i]})
    payload["models"] = models
    primary = recipe.primary if recipe.primary in kept else kept[0]
    if "primary" in payload or primary != recipe.primary:
        payload["primary"] = kept.index(primary)
    return _with_comment(comment, payload), written


def write_recipe(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (the old file, or the whole new one)."""
    from fusekit.io.files import atomic_file

    with atomic_file(path) as temp:
        temp.write_text(text, encoding="utf-8")
    return path


def merge_uniform(refs: Sequence[str], out_dir: Path, *, base: str | None = None,
                  device: str = "cpu") -> Path:
    """Write the uniform linear merge of ``refs`` (full rank) to ``out_dir``; one ref is copied as is."""
    import fusekit

    with tempfile.TemporaryDirectory(prefix="fusekit-select-") as temp:
        recipe = Path(temp) / "merge.yaml"
        recipe.write_text(merge_recipe_text(refs, comment="uniform merge", base=base), encoding="utf-8")
        fusekit.merge(recipe, out_dir, device=device)
    return out_dir


def merged_bpb(refs: Sequence[str], texts: Sequence[str], *, base: str | None = None, device: str = "cpu",
               dtype: str | None = "float32", batch_size: int = 8) -> float:
    """Bits per byte of ``texts`` under the uniform linear merge of ``refs``, built in a temporary folder
    (slow: one merge and one scoring pass per call)."""
    from fusekit.lm.load import load_lm
    from fusekit.lm.score import score_texts

    with tempfile.TemporaryDirectory(prefix="fusekit-select-") as temp:
        folder = merge_uniform(refs, Path(temp) / "merged", base=base, device=device)
        lm = load_lm(folder, device=device, dtype=dtype)
        scores = score_texts(lm, texts, batch_size=batch_size)
        del lm
    return sum(s.nll_nats for s in scores) / math.log(2) / sum(s.n_bytes for s in scores)
