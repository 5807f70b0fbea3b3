"""Load an ensemble and generate with it.

:class:`Ensemble` holds the loaded members and the recipe's method, built from the method table
(:mod:`fusekit.ensemble.methods`) into a small object of one of three families; :meth:`Ensemble.generate`
hands it to the family's driver in :mod:`fusekit.ensemble.decoding`, which decodes with the one decode
loop and sampler of :mod:`fusekit.lm.decode`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import cast

import torch

from fusekit.ensemble.base import AnswerMethod, CrossMethod, MethodContext, TokenMethod
from fusekit.ensemble.decoding import decode_ids, decode_text, vote_answers
from fusekit.ensemble.members import Member, logit_width, token_vocab
from fusekit.ensemble.methods import build_method, method_spec
from fusekit.ensemble.recipe import EnsembleRecipe, load_ensemble_recipe
from fusekit.ensemble.results import Answer, GenerationResult
from fusekit.errors import FusekitError, RecipeError
from fusekit.recipe.load import RecipeSource
from fusekit.recipe.numbers import check_option, check_seed, check_temperature

__all__ = ["Answer", "Ensemble", "GenerationResult", "load_ensemble", "load_members"]


def _same_tokenizer_problem(members: Sequence[Member], primary: int) -> tuple[int, float] | None:
    base = members[primary].vocab
    for m in members:
        if m.vocab.fingerprint != base.fingerprint:
            shared = len(set(m.vocab.by_bytes) & set(base.by_bytes))
            return m.index, shared / max(1, len(set(m.vocab.by_bytes) | set(base.by_bytes)))
    return None


class Ensemble:
    """Loaded members plus the recipe's method; see :func:`load_ensemble`.

    Args:
        recipe: the parsed recipe.
        members: its loaded models, in recipe order (see :func:`load_members`).
        source: where the recipe came from, for error messages with file and line.
        weights: member weights summing to 1 (default: the recipe's, normalised).

    Attributes:
        method: the method's name; ``spec`` is its row of the method table and ``method_impl`` the
            object built from it (a token, cross-vocabulary or answer method).
        params: the method's validated parameters.
        context: members, primary and weights as the method sees them.

    Raises:
        RecipeError: a one-vocabulary method over members with different tokenizers.
        FusekitError: the method cannot be set up (e.g. relative tables over the memory budget).
    """

    def __init__(self, recipe: EnsembleRecipe, members: list[Member], *, source: RecipeSource | None = None,
                 weights: Sequence[float] | None = None) -> None:
        self.recipe = recipe
        self.members = members
        self.method = recipe.method
        self.spec = method_spec(recipe.method)
        self.primary = recipe.primary
        self.params = recipe.params()
        self.weights = list(weights) if weights is not None else recipe.weights()
        self.source = source
        problem = _same_tokenizer_problem(members, self.primary)
        self.same_tokenizer = problem is None
        if self.spec.family == "same" and problem is not None:
            i, share = problem
            where = source.where(("models", i, "model")) + " " if source else ""
            raise RecipeError(
                f"{where}models[{i}].model: '{members[i].ref}' has a different "
                f"tokenizer from the primary '{members[self.primary].ref}' ({share:.0%} of token spellings "
                f"shared); method {self.method} needs one vocabulary; use method: union or relative")
        self.context = MethodContext(members, self.primary, self.weights)
        self.method_impl = build_method(self.method, self.params, self.context)

    @property
    def primary_member(self) -> Member:
        """The member whose tokenizer reads prompts and whose vocabulary results are over."""
        return self.members[self.primary]

    def cross_weights(self, present: Sequence[int]) -> dict[int, float]:
        """Weights of the members taking part at one position, renormalised to sum to 1.

        Args:
            present: indices of the members taking part.

        Returns:
            Member index → weight.
        """
        return self.context.renormalised(present)

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int | None = None,
                 temperature: float | None = None, seed: int | None = None,
                 batch_size: int = 8) -> GenerationResult:
        """Continue each prompt; options default to the recipe's ``generation`` block.

        One-vocabulary methods decode ``batch_size`` prompts at a time, the batch from prompt ``i`` on
        sampled with seed ``seed + i`` (as :func:`fusekit.lm.generate.generate` does, so a one-model
        ensemble samples what the model alone samples); cross-vocabulary methods decode one prompt
        after another with one generator; ``vote`` and ``mbr`` seed each member's ``k``-th sample
        with ``seed + k``.

        Args:
            prompts: the prompt texts.
            max_new_tokens: most new tokens per prompt.
            temperature: 0 for greedy decoding, else the sampling temperature.
            seed: seeds the sampler.
            batch_size: prompts decoded together (one-vocabulary methods).

        Returns:
            The answers, in prompt order, and run statistics.

        Raises:
            FusekitError: no prompts, an empty prompt, or a prompt too long for a member's context.

        Example:
            >>> result = ens.generate(["def fib("], max_new_tokens=16)  # doctest: +SKIP
            >>> result.answers[0].text, result.summary()["tokens_per_second"]  # doctest: +SKIP
        """
        max_new, temp, seed = self._options(prompts, max_new_tokens, temperature, seed)
        started = time.perf_counter()
        result = GenerationResult([], 0.0, [0] * len(self.members))
        family, impl = self.spec.family, self.method_impl
        if family == "answer":
            result.answers = vote_answers(self, cast(AnswerMethod, impl), prompts, max_new=max_new,
                                          temperature=temp, seed=seed, result=result)
        elif family == "byte":
            result.answers = self._generate_bytes(prompts, max_new, temp, seed, result)
        elif family == "cross":
            generator = torch.Generator().manual_seed(seed)
            result.answers = [decode_text(self, cast(CrossMethod, impl), prompt, max_new=max_new,
                                          temperature=temp, generator=generator, result=result)
                              for prompt in prompts]
        else:
            everyone = range(len(self.members))
            step = max(1, batch_size)
            for lo in range(0, len(prompts), step):
                generator = torch.Generator().manual_seed(seed + lo)
                result.answers += decode_ids(self, cast(TokenMethod, impl), everyone, prompts[lo:lo + step],
                                             max_new=max_new, temperature=temp, generator=generator,
                                             result=result)
        result.seconds = time.perf_counter() - started
        return result

    def _generate_bytes(self, prompts: Sequence[str], max_new: int, temperature: float, seed: int,
                        result: GenerationResult) -> list[Answer]:
        """``method: byte``: each prompt continued byte by byte (``max_new`` bytes at most)."""
        from fusekit.ensemble.bytes.generate import generate_bytes
        from fusekit.ensemble.bytes.method import ByteMethod

        generator = torch.Generator().manual_seed(seed)
        method = cast(ByteMethod, self.method_impl)
        return [generate_bytes(method, prompt, max_new=max_new, temperature=temperature, generator=generator,
                               result=result, stop_at_eos=self.recipe.generation.stop_at_eos)
                for prompt in prompts]

    def _options(self, prompts: Sequence[str], max_new_tokens: int | None, temperature: float | None,
                 seed: int | None) -> tuple[int, float, int]:
        """The options with the recipe's defaults filled in, checked."""
        gen = self.recipe.generation
        max_new = gen.max_new_tokens if max_new_tokens is None else max_new_tokens
        temp = gen.temperature if temperature is None else temperature
        if not prompts:
            raise FusekitError("no prompts were given; pass --prompt TEXT or a --prompts file with lines")
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise FusekitError(f"prompt {i} is empty; every prompt needs some text")
        if max_new < 1:
            raise FusekitError(f"--max-new-tokens {max_new}: must be at least 1")
        check_option("--temperature", check_temperature, temp)
        if seed is not None:
            check_option("--seed", check_seed, seed)
        return max_new, temp, gen.seed if seed is None else seed


def load_members(recipe: EnsembleRecipe, *, device: str = "cpu", dtype: str | None = None) -> list[Member]:
    """Load every model of the recipe with its tokenizer; LoRA adapters over one base share one
    copy of it as the recipe's ``shared_base`` says (see :func:`fusekit.lm.library.load_members`).

    Args:
        recipe: the parsed recipe.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: overrides the recipe's ``dtype``.

    Returns:
        One :class:`~fusekit.ensemble.members.Member` per ``models:`` entry.

    Raises:
        FusekitError: a model or its tokenizer cannot be found or loaded.
    """
    from fusekit.lm.library import load_members as load_lms

    weights = recipe.weights()
    lms = load_lms(recipe.refs(), device=device, dtype=dtype or recipe.dtype, share=recipe.shared_base)
    return [Member(i, lm.ref, lm, weights[i], token_vocab(lm.tokenizer, logit_width(lm)))
            for i, lm in enumerate(lms)]


def load_ensemble(recipe: EnsembleRecipe | Path | str, *, device: str = "cpu",
                  dtype: str | None = None) -> Ensemble:
    """Load an ensemble recipe (a path or a parsed recipe) and every model it names.

    Args:
        recipe: a recipe file, or a parsed :class:`EnsembleRecipe`.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: overrides the recipe's ``dtype``.

    Returns:
        The :class:`Ensemble`, ready to generate.

    Raises:
        RecipeError: the recipe is invalid (one line with file and line).
        FusekitError: a model cannot be loaded, or the method cannot be set up.

    Example:
        >>> ens = load_ensemble("configs/ensemble/prob_avg.yaml")  # doctest: +SKIP
        >>> ens.generate(["def fib("]).answers[0].text  # doctest: +SKIP
    """
    source = None
    if not isinstance(recipe, EnsembleRecipe):
        recipe, source = load_ensemble_recipe(recipe)
    return Ensemble(recipe, load_members(recipe, device=device, dtype=dtype), source=source)


