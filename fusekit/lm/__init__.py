"""Run a model: load it with transformers from a resolved reference, score text, generate.

Needs the ``lm`` extra (transformers). Nothing on the plain merge path imports this package.
"""

from fusekit.lm.load import LoadedLM, load_lm, resolve_device

__all__ = ["LoadedLM", "load_lm", "resolve_device"]
