"""Run a model: load it with transformers from a resolved reference, score text, generate.

Needs the ``lm`` extra (transformers). Nothing on the plain merge path imports this package.
"""

from fusekit.device import resolve_device
from fusekit.lm.load import LoadedLM, load_lm
from fusekit.lm.score import TextScore, score_text, score_texts, token_logprobs

__all__ = ["LoadedLM", "TextScore", "load_lm", "resolve_device", "score_text", "score_texts",
           "token_logprobs"]
