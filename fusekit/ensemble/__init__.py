"""Ensembles: combine models token by token (same or different tokenizers), cascade them, or let
them vote on whole answers; score any ensemble in bits per byte.

Needs the ``lm`` extra (transformers). Public names:

- :func:`load_ensemble_recipe`, :class:`EnsembleRecipe`: the YAML recipe.
- :func:`load_ensemble`, :class:`Ensemble`: load the models; ``Ensemble.generate``.
- :func:`score_ensemble`: bits per byte of a text for the ensemble and each member.
- :func:`check_ensemble`: compatibility and cost report without loading weights.

Each ``method:`` is one row of :data:`fusekit.ensemble.methods.METHODS` (family, typed parameters,
builder); the three families' drivers are in :mod:`fusekit.ensemble.decoding`, and every token is
chosen by the one decode loop and sampler of :mod:`fusekit.lm.decode`, which ``fusekit.lm.generate``
and ``fusekit route run --generate`` use too.
"""

from fusekit.ensemble.recipe import EnsembleRecipe, load_ensemble_recipe, parse_ensemble_recipe

__all__ = ["Ensemble", "EnsembleRecipe", "check_ensemble", "load_ensemble", "load_ensemble_recipe",
           "parse_ensemble_recipe", "score_ensemble"]


def __getattr__(name: str) -> object:  # heavy parts (torch models, transformers) load on first use
    if name in ("Ensemble", "load_ensemble"):
        from fusekit.ensemble import engine

        return getattr(engine, name)
    if name == "score_ensemble":
        from fusekit.ensemble.scoring import score_ensemble

        return score_ensemble
    if name == "check_ensemble":
        from fusekit.ensemble.check import check_ensemble

        return check_ensemble
    raise AttributeError(name)
