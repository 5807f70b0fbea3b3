"""Where each row of an aligned embedding or LM head comes from, as mergekit 0.1.5 fills them.

For one output tensor and the models that feed it, a model's row for a token is its own row when it
has the token. Otherwise the row is filled, the same for every model that lacks it:

* the token is in exactly one model: that model's row;
* in none: zeros;
* in the base model (when it feeds the tensor): the base's row;
* otherwise: the mean of the rows of the models that have it.

A ``tokenizer.tokens`` entry replaces that choice with its ``source`` (a model's own row for the
token, ``{kind: model_token}``: a given token's row of a given model, ``{kind: zero}``), used for
the models lacking the token, or for all of them with ``force: true``. Rows past the vocabulary
(``pad_to_multiple_of``) are each model's mean over its aligned rows.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from fusekit.errors import RecipeError
from fusekit.recipe.schema import ModelTokenSource, TokenEmbedding, ZeroSource
from fusekit.vocab.files import TokenizerVocab
from fusekit.vocab.union import OutputVocab


@dataclass(frozen=True)
class RowRule:
    """A filled row: the mean of ``sources`` (``(model, stored row)`` pairs); zeros when empty."""

    sources: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class GroupRows:
    """The rows of one output tensor's inputs.

    Attributes:
        models: the models feeding the tensor, in the order the task reads them.
        fills: output id → rule, for every token some model lacks (or whose entry forces a source).
        forced: output ids every model takes from ``fills``.
    """

    models: tuple[str, ...]
    fills: dict[int, RowRule]
    forced: frozenset[int]

    def own_rows(self, permutation: Sequence[int]) -> list[int]:
        """A model's stored row for each output id, -1 where the row is filled."""
        return [-1 if out_id in self.forced else row for out_id, row in enumerate(permutation)]


def group_rows(vocab: OutputVocab, permutations: Mapping[str, Sequence[int]], models: Sequence[str], *,
               base: str | None, tokens: Mapping[str, TokenEmbedding],
               originals: Mapping[str, TokenizerVocab], output: str) -> GroupRows:
    """The fill rules for one output tensor.

    Args:
        vocab: the output vocabulary.
        permutations: each model's output id → stored row (-1: lacks the token).
        models: the models feeding the tensor.
        base: the recipe's base model for it, or None.
        tokens: the recipe's ``tokenizer.tokens`` entries.
        originals: each model's own vocabulary (for ``model_token`` sources).
        output: the tensor's name, for messages.

    Raises:
        RecipeError: a ``tokens`` entry names a model that does not feed the tensor, a token that
            model lacks, or has no source while a model lacks the token.
    """
    fills: dict[int, RowRule] = {}
    forced = set()
    for token, out_id in vocab.tokens.items():
        present = [m for m in models if permutations[m][out_id] >= 0]
        entry = tokens.get(token)
        if entry is not None and entry.force:
            forced.add(out_id)
        elif len(present) == len(models):
            continue
        if entry is not None:
            fills[out_id] = _configured(token, out_id, entry, permutations, models, originals, output)
        elif len(present) == 1 or (base in models and base in present):
            chosen = present[0] if len(present) == 1 else str(base)
            fills[out_id] = RowRule(((chosen, permutations[chosen][out_id]),))
        else:
            fills[out_id] = RowRule(tuple((m, permutations[m][out_id]) for m in present))
    return GroupRows(tuple(models), fills, frozenset(forced))


def _configured(token: str, out_id: int, entry: TokenEmbedding, permutations: Mapping[str, Sequence[int]],
                models: Sequence[str], originals: Mapping[str, TokenizerVocab], output: str) -> RowRule:
    where = f"tokenizer.tokens[{token!r}]"
    source = entry.source
    if isinstance(source, ZeroSource):
        return RowRule(())
    if source is None:
        lacking = next(m for m in models if permutations[m][out_id] < 0 or entry.force)
        raise RecipeError(f"{where}: model '{lacking}' needs a row for it (tensor '{output}') but the "
                          "entry has no source; add source: <model>, {kind: zero} or "
                          "{kind: model_token, ...}")
    model = source.model if isinstance(source, ModelTokenSource) else source
    if model not in models:
        raise RecipeError(f"{where}: its source model '{model}' does not feed tensor '{output}' "
                          f"(models: {', '.join(models)}); name one of those")
    if isinstance(source, ModelTokenSource):
        row = source.token_id
        if row is None:
            row = originals[model].tokens.get(str(source.token), -1)
            if row < 0:
                raise RecipeError(f"{where}: token {source.token!r} is not in model '{model}''s "
                                  "vocabulary; name a token it has, or give token_id")
        return RowRule(((model, row),))
    row = permutations[model][out_id]
    if row < 0:
        raise RecipeError(f"{where}: model '{model}' has no token {token!r} to take its row from; "
                          "name a model that has it, or use {kind: model_token, model, token}")
    return RowRule(((model, row),))
