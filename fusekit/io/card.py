"""The model card (README.md) of a merged model: Hub metadata plus what was merged and how.

The front matter follows the Hub's model card spec: ``base_model`` holds Hub repository ids only (the
Hub refuses a README whose ``base_model`` is not one), with ``base_model_relation: merge`` so the
model tree shows the output as a merge of them; the tags include ``merge`` and ``mergekit``, which
the Hub's model filters and users search by. Every input, local folders included, is listed by name
under ``fusekit.inputs`` and in the body; a stochastic method's seed appears (``fusekit.random_seed``
and the rebuild command), a deterministic one's does not. No timestamp or absolute path is written,
so the same merge always writes the same card.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import yaml

from fusekit.io.refs import hub_repo_id
from fusekit.version import __version__

RECIPE_COPY = "mergekit_config.yml"  # the name Hub tooling looks for, so merges are recognised
CARD_TAGS = ("merge", "mergekit", "fusekit")


def card_metadata(*, refs: Iterable[str], method: str, names: Mapping[str, str] | None = None,
                  tags: Iterable[str] = (), seed: int | None = None, recipe_file: str = RECIPE_COPY,
                  library: str = "transformers") -> dict[str, object]:
    """The YAML front matter of a merge's card (:func:`model_card`, the MoE card).

    Args:
        refs: every input as the recipe names it (a LoRA pair as its base).
        method: the merge method, recorded as ``merge_method``.
        names: ref → the name the card gives it (default: as written).
        tags: tags after ``merge``, ``mergekit`` and ``fusekit``.
        seed: a stochastic method's seed; None (a deterministic method) records none.
        recipe_file: the recipe copy written beside the weights.
        library: the Hub's ``library_name``.

    Example:
        >>> card_metadata(refs=["org/a", "/data/b"], method="ties", names={"/data/b": "b"})["base_model"]
        ['org/a']
    """
    refs = list(dict.fromkeys(refs))
    shown = dict(names or {})
    hub_models = list(dict.fromkeys(h for h in map(hub_repo_id, refs) if h))
    about: dict[str, object] = {"inputs": [shown.get(ref, ref) for ref in refs], "recipe": recipe_file}
    if seed is not None:
        about["random_seed"] = seed
    return {
        **({"base_model": hub_models, "base_model_relation": "merge"} if hub_models else {}),
        "library_name": library,
        "tags": list(dict.fromkeys([*CARD_TAGS, *tags])),
        "merge_method": method,
        "fusekit": about,
    }


def front_matter(metadata: Mapping[str, object]) -> list[str]:
    """``metadata`` as the card's first lines: YAML between ``---`` markers."""
    return ["---", yaml.safe_dump(dict(metadata), sort_keys=False, allow_unicode=True).strip(), "---"]


def rebuild_lines(command: str, recipe_file: str, recipe_text: str, seed: int | None, *,
                  locked: bool = True) -> list[str]:
    """The card's "Recipe" section: the command that rebuilds the output, the seed of a stochastic
    method (``locked``: and that ``--locked`` reuses the lock's), and the recipe."""
    flag = f" --random-seed {seed}" if seed is not None else ""
    lock_text = " `--locked --lock-file fusekit.lock` rebuilds with the seed the lock records." * locked
    seed_lines = [] if seed is None else [
        f"Random seed: `{seed}`. The method draws random numbers, so the seed decides the weights."
        f"{lock_text}", ""]
    return [
        "## Recipe", "",
        f"The recipe below is saved beside the weights as `{recipe_file}`; "
        f"`{command} {recipe_file} OUT_DIR{flag}` rebuilds this model.", "",
        *seed_lines,
        "```yaml", recipe_text.strip(), "```", "",
    ]


def input_line(ref: str, shown: str, *, base: bool = False, note: str = "") -> str:
    """One input in the card's list: its name, whether it is the base, a Hub model or a local folder."""
    where = "Hub model" if hub_repo_id(ref) else "local folder"
    return f"- `{shown}` ({'base, ' if base else ''}{where}){note}"


def model_card(*, name: str, method: str, models: list[str], base: str | None, recipe_text: str,
               seed: int | None = None, extra_metadata: dict[str, object] | None = None,
               names: Mapping[str, str] | None = None,
               adapters: Mapping[str, tuple[str, str]] | None = None,
               recipe_file: str = RECIPE_COPY) -> str:
    """README.md text: YAML front matter, a summary, the inputs and the recipe.

    Args:
        name: the card's title (the output folder's name).
        method: the merge method.
        models: every input as the recipe names it; base: the base model's reference, if any.
        recipe_text: the recipe as written (its references renamed as ``names`` says).
        seed: a stochastic method's seed; None for a deterministic method (no seed is shown).
        extra_metadata: front-matter keys that replace or add to :func:`card_metadata`'s (``tags``
            are added to the card's own).
        names: ref → how the card names it (:func:`fusekit.io.lock.portable_refs`), so that a model
            the recipe names by absolute path appears relative to the recipe, in the list and in the
            recipe shown; default: as written.
        adapters: ref → (base, adapter) for the models that are LoRA adapters applied to a base:
            the metadata's ``base_model`` names the base, the tags add ``lora``, the list says so.
        recipe_file: the name of the recipe copy written beside the weights.

    Example:
        >>> model_card(name="m", method="linear", models=["org/a"], base=None,
        ...            recipe_text="merge_method: linear").splitlines()[1]
        'base_model:'
    """
    shown = dict(names or {})
    applied = dict(adapters or {})
    bases = [applied[ref][0] if ref in applied else ref for ref in models]
    extra = dict(extra_metadata or {})
    tags = [*(["lora"] if applied else []), *_strings(extra.pop("tags", []))]
    metadata = card_metadata(refs=bases, method=method, names=shown, seed=seed, recipe_file=recipe_file,
                             tags=tags)
    if "base_model" in extra:  # whoever names the base model says how the output relates to it
        metadata.pop("base_model_relation", None)
    metadata.update(extra)
    base_text = f" with `{shown.get(base, base)}` as the base" if base else ""
    lines = [
        *front_matter(metadata), "", f"# {name}", "",
        f"This model was made by merging pre-trained language models with fusekit {__version__} "
        f"(mergekit's recipe format), using the `{method}` method{base_text}.", "",
        "## Models merged", "",
        *[input_line(ref, shown.get(ref, ref), base=ref == base, note=_adapter_note(applied.get(ref), shown))
          for ref in models], "",
        *rebuild_lines("fusekit merge", recipe_file, _rename(recipe_text, shown), seed),
    ]
    return "\n".join(lines)


def _strings(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, (list, tuple)) else []


def _adapter_note(pair: tuple[str, str] | None, shown: Mapping[str, str]) -> str:
    if pair is None:
        return ""
    base, adapter = pair
    return f": LoRA adapter `{shown.get(adapter, adapter)}` applied to `{shown.get(base, base)}`"


def _rename(text: str, names: Mapping[str, str]) -> str:
    """``text`` with every renamed reference replaced, longest first (one may prefix another)."""
    for ref in sorted(names, key=len, reverse=True):
        if names[ref] != ref:
            text = text.replace(ref, names[ref])
    return text
