"""The model card (README.md) of a merged model: Hub metadata plus what was merged and how."""

from __future__ import annotations

from collections.abc import Mapping

import yaml

from fusekit.io.refs import hub_repo_id
from fusekit.version import __version__


def model_card(*, name: str, method: str, models: list[str], base: str | None, recipe_text: str,
               seed: int | None = None, extra_metadata: dict[str, object] | None = None,
               names: Mapping[str, str] | None = None) -> str:
    """README.md text: YAML front matter, a summary, the inputs and the recipe.

    Args:
        names: ref → how the card names it (:func:`fusekit.io.lock.portable_refs`), so that a model
            the recipe names by absolute path appears relative to the recipe, in the list and in the
            recipe shown; default: as written.
    """
    shown = dict(names or {})
    hub_models = list(dict.fromkeys(h for h in map(hub_repo_id, models) if h))
    metadata: dict[str, object] = {
        "base_model": hub_models,
        "library_name": "transformers",
        "tags": ["merge", "fusekit"],
        "merge_method": method,
        **(extra_metadata or {}),
    }
    front = yaml.safe_dump(metadata, sort_keys=False).strip()
    base_text = f" with `{shown.get(base, base)}` as the base" if base else ""
    lines = [
        "---", front, "---", "", f"# {name}", "",
        f"This model was made by merging pre-trained language models with fusekit {__version__}, "
        f"using the `{method}` method{base_text}.", "",
        "## Models merged", "",
        *[f"- `{shown.get(ref, ref)}`{' (base)' if ref == base else ''}" for ref in models], "",
        "## Recipe", "",
        "The recipe below reproduces this model with "
        f"`fusekit merge recipe.yaml OUT_DIR{f' --random-seed {seed}' if seed is not None else ''}`.",
        "",
        "```yaml", _rename(recipe_text, shown).strip(), "```", "",
    ]
    return "\n".join(lines)


def _rename(text: str, names: Mapping[str, str]) -> str:
    """``text`` with every renamed reference replaced, longest first (one may prefix another)."""
    for ref in sorted(names, key=len, reverse=True):
        if names[ref] != ref:
            text = text.replace(ref, names[ref])
    return text
