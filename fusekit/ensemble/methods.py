"""The table of ensemble methods: name → family, typed parameters and a builder.

Every ``method:`` a recipe may name is one row here. The builder turns the method's validated
parameters (the pydantic models of :mod:`fusekit.ensemble.recipe`) and the loaded members into a
small object with its family's protocol (:mod:`fusekit.ensemble.base`); the decoders and the scorer
switch on the family only, never on a method's name. A new method is a new row.

Example:
    >>> spec = method_spec("logit_avg")
    >>> spec.family, spec.params.__name__
    ('same', 'LogitAvgParams')
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel

from fusekit.ensemble import recipe as r
from fusekit.ensemble.align import RelativeAligner, UnionVocab
from fusekit.ensemble.base import AnswerMethod, CrossMethod, Family, MethodContext, TokenMethod
from fusekit.ensemble.bytes.method import ByteMethod
from fusekit.ensemble.cross_vocab import RelativeMethod, UnionMethod
from fusekit.ensemble.members import Member
from fusekit.ensemble.same_vocab import CascadeMethod, MixMethod
from fusekit.ensemble.vote import MbrMethod, VoteMethod

Built = TokenMethod | CrossMethod | AnswerMethod | ByteMethod
Builder = Callable[[Any, MethodContext], Built]


@dataclass(frozen=True)
class MethodSpec:
    """One ensemble method.

    Attributes:
        name: the ``method`` value in recipes.
        family: how it is driven (see :data:`fusekit.ensemble.base.Family`).
        params: the pydantic model of its ``parameters``.
        build: ``(params, context) → method object``.
        distribution: whether it gives a full next-token distribution (and so bits per byte).
    """

    name: str
    family: Family
    params: type[BaseModel]
    build: Builder
    distribution: bool = True


def _relative(p: r.RelativeParams, ctx: MethodContext) -> RelativeMethod:
    from fusekit.cache import cache_folder
    from fusekit.sizes import parse_size

    cache = Path(p.cache_dir).expanduser() if p.cache_dir else cache_folder() / "align"
    aligner = RelativeAligner(
        [m.vocab for m in ctx.members], [_embeddings(m, p.embeddings) for m in ctx.members],
        primary=ctx.primary, max_anchors=p.max_anchors,
        max_table_bytes=parse_size(p.max_table_memory, "parameters.max_table_memory"),
        sparsify=p.sparsify, sparse_k=p.sparse_k, cache_dir=cache, neighbours=p.neighbours,
        temperature=p.temperature)
    return RelativeMethod(ctx, aligner, p.gate, p.steps, p.learning_rate, p.candidates)


def _embeddings(member: Member, which: str) -> torch.Tensor:
    model = member.lm.model
    layer = model.get_output_embeddings() if which == "output" else model.get_input_embeddings()
    weight = layer.weight
    assert isinstance(weight, torch.Tensor)
    return weight


def _union(ctx: MethodContext) -> UnionVocab:
    return UnionVocab([m.vocab for m in ctx.members])


METHODS: dict[str, MethodSpec] = {spec.name: spec for spec in (
    MethodSpec("prob_avg", "same", r.ProbAvgParams, lambda p, ctx: MixMethod("prob_avg", p.gate)),
    MethodSpec("logit_avg", "same", r.LogitAvgParams, lambda p, ctx: MixMethod("logit_avg", p.gate)),
    MethodSpec("cascade", "same", r.CascadeParams, lambda p, ctx: CascadeMethod(p.threshold)),
    MethodSpec("union", "cross", r.UnionParams, lambda p, ctx: UnionMethod(ctx, _union(ctx), p.gate)),
    MethodSpec("topk_union", "cross", r.TopkUnionParams,
               lambda p, ctx: UnionMethod(ctx, _union(ctx), p.gate, p.top_k), distribution=False),
    MethodSpec("relative", "cross", r.RelativeParams, _relative),
    MethodSpec("vote", "answer", r.VoteParams, lambda p, ctx: VoteMethod(p.samples), distribution=False),
    MethodSpec("mbr", "answer", r.MbrParams, lambda p, ctx: MbrMethod(p.samples, p.utility),
               distribution=False),
    MethodSpec("byte", "byte", r.ByteParams, lambda p, ctx: ByteMethod(ctx, p.beam, p.gate)),
)}

_FAMILIES = {"same": r.SAME_VOCAB_METHODS, "cross": r.CROSS_VOCAB_METHODS, "answer": r.ANSWER_METHODS,
             "byte": r.BYTE_METHODS}
if set(METHODS) != set(r.METHODS) or any(spec.params is not r.PARAMS[spec.name]
                                         or spec.name not in _FAMILIES[spec.family]
                                         for spec in METHODS.values()):
    raise RuntimeError("fusekit.ensemble.methods and fusekit.ensemble.recipe name different methods")


def method_spec(name: str) -> MethodSpec:
    """The table row of method ``name`` (a name the recipe schema accepted).

    Args:
        name: a method name, e.g. ``prob_avg``.

    Returns:
        Its :class:`MethodSpec`.

    Raises:
        KeyError: no such method (recipes are validated before this is asked).
    """
    return METHODS[name]


def build_method(name: str, params: BaseModel, context: MethodContext) -> Built:
    """The method object for ``name`` with validated ``params`` over ``context``'s members.

    Args:
        name: the method's name.
        params: an instance of ``method_spec(name).params``.
        context: the loaded members, the primary and the normalised weights.

    Returns:
        An object with the protocol of the method's family.

    Raises:
        FusekitError: the method cannot be set up (e.g. relative tables over the memory budget).
    """
    return METHODS[name].build(params, context)
