"""The vocabulary alignment of a merge: built from the recipe's tokenizer settings and the models'
tokenizer files, attached to the plan's embedding and LM-head tasks, and stored on the plan.

:func:`vocab_alignment` builds it before the tasks (their inputs' shapes are the aligned ones);
:meth:`VocabAlignment.attach` then records, for each embedding / LM-head task, which models feed it
and how their rows are filled (:mod:`fusekit.vocab.rows`). Readers wrapped by
:class:`fusekit.vocab.reader.AlignedReader` serve the aligned tensors.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from fusekit.arch import is_embedding, is_lm_head, role
from fusekit.errors import RecipeError
from fusekit.io.refs import ResolvedModel
from fusekit.io.tokenizer import TOKENIZER_FILES
from fusekit.recipe.schema import MergeRecipe, TokenEmbedding
from fusekit.vocab.files import TokenizerVocab, read_vocab
from fusekit.vocab.rows import GroupRows, group_rows
from fusekit.vocab.union import OutputVocab, build_output_vocab, permutation

log = logging.getLogger("fusekit")

PAD_BLOCK_ROWS = 4096  # rows per block while summing a padding mean


def is_vocab_tensor(name: str) -> bool:
    """Whether a tensor has one row per token (the input embedding or the LM head)."""
    return is_embedding(name) or is_lm_head(name)


@dataclass(frozen=True)
class VocabAlignment:
    """Every model's embedding and LM-head rows, permuted into the output vocabulary.

    Attributes:
        vocab: the output vocabulary.
        permutations: each model's output id → its row (-1 where it lacks the token).
        rows: each model's stored rows (its config's ``vocab_size``).
        dtype: the dtype aligned tensors are served in (the recipe's ``dtype``, else the widest stored).
        tokens: the recipe's ``tokenizer.tokens`` entries.
        originals: each model's own vocabulary.
        groups: output tensor → how its inputs' rows are filled (after :meth:`attach`).
        served: (model, name a task reads) → (stored name, output tensor it feeds).
    """

    vocab: OutputVocab
    permutations: dict[str, list[int]]
    rows: dict[str, int]
    dtype: torch.dtype
    tokens: dict[str, TokenEmbedding]
    originals: dict[str, TokenizerVocab]
    groups: dict[str, GroupRows] = field(default_factory=dict)
    served: dict[tuple[str, str], tuple[str, str]] = field(default_factory=dict)

    @property
    def size(self) -> int:
        """Rows of every aligned tensor."""
        return self.vocab.size

    def stored_name(self, model: str, name: str) -> str:
        """The stored tensor a task's input ``name`` of ``model`` is aligned from (``name`` itself
        when it is not aligned)."""
        return self.served.get((model, name), (name, ""))[0]

    def missing(self) -> dict[str, int]:
        """How many output tokens each model lacks."""
        return {ref: sum(1 for row in perm if row < 0) for ref, perm in self.permutations.items()}

    def attach(self, tasks: Any, *, first_base: str | None,
               last_base: str | None) -> tuple[list[Any], VocabAlignment]:
        """Record the fill rules of every embedding / LM-head task; rename inputs read twice.

        A stored tensor that feeds two such tasks with different rules (a tied model's embedding,
        also its LM head) is read under a second name, ``<name>@<output>``.

        Args:
            tasks: the plan's tasks.
            first_base / last_base: the base model of the first slice (for embeddings) and of the
                last (for LM heads).

        Returns:
            The tasks (renamed where needed) and the alignment with its groups.
        """
        groups: dict[str, GroupRows] = {}
        served: dict[tuple[str, str], tuple[str, str]] = {}
        result = []
        for task in tasks:
            if not is_vocab_tensor(task.output):
                result.append(task)
                continue
            models = [i.model for i in task.all_inputs]
            groups[task.output] = group_rows(self.vocab, self.permutations, models,
                                             base=first_base if role(task.output) == "pre" else last_base,
                                             tokens=self.tokens,
                                             originals=self.originals, output=task.output)
            self._check_token_ids(groups[task.output], task.output)
            result.append(_rename(task, served))
        return result, replace(self, groups=groups, served=served)

    def _check_token_ids(self, group: GroupRows, output: str) -> None:
        for rule in group.fills.values():
            for model, row in rule.sources:
                if row >= self.rows[model]:
                    raise RecipeError(f"tokenizer.tokens: row {row} of model '{model}' does not exist "
                                      f"(tensor '{output}' has {self.rows[model]} rows); use a smaller "
                                      "token_id")

    def buffer_bytes(self, row_numel: int) -> int:
        """Memory aligned reads keep beyond their output blocks: the filled rows, one padding row
        per model and tensor, and the float64 row that sums a padding mean.

        Args:
            row_numel: elements of one row (the hidden size).
        """
        fills = sum(len(g.fills) for g in self.groups.values())
        if self.size == self.vocab.length:
            return fills * row_numel * self.dtype.itemsize
        pads = sum(len(g.models) for g in self.groups.values()) + min(self.vocab.length, PAD_BLOCK_ROWS)
        return (fills + pads) * row_numel * self.dtype.itemsize + row_numel * 8

def _rename(task: Any, served: dict[tuple[str, str], tuple[str, str]]) -> Any:
    def one(tensor_input: Any) -> Any:
        name = tensor_input.name
        if (tensor_input.model, name) in served:
            name = f"{name}@{task.output}"
        served[(tensor_input.model, name)] = (tensor_input.name, task.output)
        return replace(tensor_input, name=name)

    inputs = tuple(one(i) for i in task.inputs)
    base = one(task.base) if task.base is not None else None
    return replace(task, inputs=inputs, base=base)


def tokenizer_settings(recipe: MergeRecipe) -> tuple[str | None, dict[str, TokenEmbedding], int | None]:
    """(source, tokens, pad_to_multiple_of) from ``tokenizer_source`` or the ``tokenizer`` block."""
    if recipe.tokenizer is not None:
        block = recipe.tokenizer
        return block.source, dict(block.tokens or {}), block.pad_to_multiple_of
    return recipe.tokenizer_source, {}, None


def vocab_alignment(recipe: MergeRecipe, models: Mapping[str, ResolvedModel], *, donor: str,
                    rows: Mapping[str, int], embedded: Mapping[str, int], dtype: torch.dtype,
                    source_model: ResolvedModel | None) -> VocabAlignment | None:
    """The alignment a recipe asks for, or None when it changes no row.

    Args:
        recipe: the recipe (its ``tokenizer_source`` / ``tokenizer`` block).
        models: every model it merges.
        donor: the base model (the output's config and tokenizer files come from it).
        rows: each model's rows for tokens (its config's ``vocab_size``, at most its embedding's).
        embedded: each model's stored embedding rows.
        dtype: the dtype to serve aligned tensors in.
        source_model: the model named as tokenizer source, when one is.

    Raises:
        RecipeError: a union of tokenizers whose token strings mean different things.
        CheckpointError: a tokenizer file cannot be read.
    """
    source, tokens, pad = tokenizer_settings(recipe)
    if source is None:
        return None
    members = _member_vocabs(models, donor)
    if source == "union":
        _check_schemes(members)
    elif source != "base":
        assert source_model is not None
        members.setdefault(source, read_vocab(source, source_model.folder))
    sizes = {ref: rows[ref] for ref in members if ref in rows}
    if source not in sizes:
        sizes[source] = len(members[source].tokens) if source in members else 0
    vocab = build_output_vocab(source, members, base=donor, vocab_sizes=sizes, add_tokens=list(tokens),
                               pad_to_multiple_of=pad)
    perms = {ref: permutation(vocab, members.get(ref, members[donor]), rows[ref]) for ref in models}
    identity = list(range(vocab.length))
    forced = any(entry.force for entry in tokens.values())
    if not forced and all(p == identity and embedded[r] == vocab.size for r, p in perms.items()):
        return None
    return VocabAlignment(vocab, perms, dict(rows), dtype, tokens, members)


def has_tokenizer(model: ResolvedModel) -> bool:
    """Whether the model folder holds any tokenizer file."""
    return any((model.folder / name).is_file() for name in TOKENIZER_FILES)


def _member_vocabs(models: Mapping[str, ResolvedModel], donor: str) -> dict[str, TokenizerVocab]:
    members = {donor: read_vocab(donor, models[donor].folder)}
    for ref, model in models.items():
        if ref == donor:
            continue
        if not has_tokenizer(model):
            log.warning("model '%s' has no tokenizer files; its vocabulary is taken to be the base "
                        "model's ('%s')", ref, donor)
            continue
        members[ref] = read_vocab(ref, model.folder)
    return members


def _check_schemes(members: Mapping[str, TokenizerVocab]) -> None:
    first = next(iter(members.values()))
    for member in members.values():
        if member.scheme != first.scheme:
            raise RecipeError(
                f"tokenizer source 'union': model '{first.ref}' has a {first.scheme} tokenizer but "
                f"'{member.ref}' a {member.scheme} one; their token strings stand for different text, so "
                "their vocabularies cannot be combined; use one model's tokenizer (tokenizer_source: "
                "<model>) or merge models with tokenizers of one kind")



def plan_alignment(recipe: MergeRecipe, models: Mapping[str, ResolvedModel],
                   configs: Mapping[str, dict[str, Any]], readers: Mapping[str, Any], *,
                   donor: str, dtype: torch.dtype | None,
                   source_model: ResolvedModel | None) -> VocabAlignment | None:
    """:func:`vocab_alignment` for a plan builder: rows from each model's config (``vocab_size``, or its
    ``text_config``'s) capped by its embedding, dtype the recipe's or else the widest stored one.

    Args:
        recipe: the recipe.
        models / configs / readers: every merged model's folder, config and reader, by reference.
        donor: the base model.
        dtype: the recipe's ``dtype``, or None.
        source_model: the model named as tokenizer source, when one is.

    Returns:
        The alignment, or None when the recipe asks for none or it changes no row.
    """
    if tokenizer_settings(recipe)[0] is None:
        return None
    rows: dict[str, int] = {}
    embedded: dict[str, int] = {}
    stored = []
    for ref, reader in readers.items():
        infos = [reader.info(n) for n in reader.names() if is_vocab_tensor(n)]
        stored += [info.dtype for info in infos if info.dtype.is_floating_point]
        embedded[ref] = min((info.shape[0] for info in infos if info.shape), default=0)
        config = configs.get(ref) or {}
        size = config.get("vocab_size", (config.get("text_config") or {}).get("vocab_size"))
        rows[ref] = min(size, embedded[ref]) if isinstance(size, int) and size >= 0 else embedded[ref]
    served = dtype or _widest(stored)
    return vocab_alignment(recipe, models, donor=donor, rows=rows, embedded=embedded, dtype=served,
                           source_model=source_model)


def _widest(dtypes: list[torch.dtype]) -> torch.dtype:
    result = dtypes[0] if dtypes else torch.float32
    for dtype in dtypes[1:]:
        result = torch.promote_types(result, dtype)
    return result


def with_vocab_size(config: dict[str, Any], alignment: VocabAlignment | None) -> dict[str, Any]:
    """``config`` with its vocabulary size set to the aligned rows (in ``text_config`` when the
    size lives there)."""
    if alignment is None:
        return config
    config = dict(config)
    nested = config.get("text_config")
    if "vocab_size" not in config and isinstance(nested, dict) and "vocab_size" in nested:
        config["text_config"] = {**nested, "vocab_size": alignment.size}
    else:
        config["vocab_size"] = alignment.size
    return config
