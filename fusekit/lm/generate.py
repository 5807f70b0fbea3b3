"""Continue prompts with one model: greedy or seeded sampling, batched, with a KV cache.

Prompts are tokenised like :func:`fusekit.lm.score.score_text` reads text (BOS, when the tokenizer
has one, then the prompt's tokens without other special tokens), left-padded into a batch with
explicit position ids, so every prompt gets the same continuation as it would alone.

Example:
    >>> lm = load_lm("demo-out/experts/python")  # doctest: +SKIP
    >>> generate(lm, ["def fib("], max_new_tokens=16)  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fusekit.errors import FusekitError
from fusekit.lm.decode import CachedModel, TokenBatch, decode_loop
from fusekit.lm.load import LoadedLM
from fusekit.lm.score import encode


def prompt_ids(lm: LoadedLM, prompt: str) -> list[int]:
    """``[BOS] + tokens of prompt`` (BOS only when the tokenizer has one).

    Args:
        lm: a model loaded with its tokenizer.
        prompt: the prompt text (tokenised without other special tokens).

    Returns:
        The prompt's token ids.

    Raises:
        FusekitError: the prompt gives no tokens and the tokenizer has no BOS token.
    """
    assert lm.tokenizer is not None
    bos = lm.tokenizer.bos_token_id
    ids = ([bos] if isinstance(bos, int) else []) + encode(lm, prompt)
    if not ids:
        raise FusekitError("the prompt is empty and the tokenizer has no BOS token to start from")
    return ids


def generate_ids(lm: LoadedLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True) -> list[list[int]]:
    """New token ids for each prompt (token ids), decoded together with one KV cache.

    The decode loop and the sampler are :mod:`fusekit.lm.decode`'s, the ones ensembles use.

    Args:
        lm: a loaded model.
        prompts: token ids per prompt (each non-empty).
        max_new_tokens: most tokens added per prompt.
        temperature: 0 for greedy decoding, else sampling from softmax(logits / temperature).
        seed: seeds the sampler (one ``torch.Generator`` for the batch).
        stop_at_eos: stop a prompt after it emits the tokenizer's EOS token (kept in the output).

    Returns:
        The generated ids per prompt (without the prompt).

    Raises:
        FusekitError: a negative ``max_new_tokens`` or ``temperature``, or an empty prompt.

    Example:
        >>> new = generate_ids(lm, [prompt_ids(lm, "def f(")], max_new_tokens=4)  # doctest: +SKIP
        >>> len(new[0]) <= 4  # doctest: +SKIP
        True
    """
    if max_new_tokens < 0 or temperature < 0:
        raise FusekitError(f"max_new_tokens ({max_new_tokens}) and temperature ({temperature}) "
                           "must not be negative")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise FusekitError("a prompt has no tokens; give it text or use a tokenizer with a BOS token")
    eos = lm.tokenizer.eos_token_id if (lm.tokenizer is not None and stop_at_eos) else None
    batch = TokenBatch(prompts, max_new_tokens, pad=0, device=lm.device)
    model = CachedModel(lm.model, batch)
    return decode_loop(batch, lambda done: model.logits(), max_new_tokens=max_new_tokens,
                       temperature=temperature, generator=torch.Generator().manual_seed(seed),
                       eos=eos if isinstance(eos, int) else None)


def generate(lm: LoadedLM, prompts: Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, stop_at_eos: bool = True, batch_size: int = 8) -> list[str]:
    """Continue each prompt; returns the new text only (special tokens dropped).

    ``batch_size`` prompts are decoded together (a prompt's greedy continuation does not depend on
    the batch it is in); the prompts from index ``i`` on are sampled with seed ``seed + i`` where
    ``i`` is a multiple of ``batch_size``.

    Args:
        lm: a model loaded with its tokenizer.
        prompts: the prompt texts (see :func:`prompt_ids`).
        max_new_tokens: most tokens added per prompt.
        temperature: 0 for greedy decoding, else sampling from softmax(logits / temperature).
        seed: seeds the sampler.
        stop_at_eos: stop a prompt at the tokenizer's EOS token.
        batch_size: prompts decoded together.

    Returns:
        The new text of each prompt.

    Raises:
        FusekitError: no tokenizer, a batch size below 1, or bad arguments (see :func:`generate_ids`).

    Example:
        >>> texts = generate(lm, ["def fib("], max_new_tokens=16, temperature=0.7, seed=1)  # doctest: +SKIP
    """
    if lm.tokenizer is None:
        raise FusekitError(f"model '{lm.ref}' was loaded without a tokenizer; generating text needs one")
    if batch_size < 1:
        raise FusekitError(f"batch size {batch_size}: must be at least 1")
    texts: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        batch = [prompt_ids(lm, p) for p in prompts[lo:lo + batch_size]]
        for new in generate_ids(lm, batch, max_new_tokens=max_new_tokens, temperature=temperature,
                                seed=seed + lo, stop_at_eos=stop_at_eos):
            texts.append(str(lm.tokenizer.decode(new, skip_special_tokens=True)))
    return texts
