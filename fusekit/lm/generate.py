"""Continue prompts with one model: greedy or seeded sampling, batched, with a KV cache.

Prompts are tokenised like :func:`fusekit.lm.score.score_text` reads text (BOS, when the tokenizer
has one, then the prompt's tokens without other special tokens), left-padded into a batch with
explicit position ids, so every prompt gets the same continuation as it would alone.

Example:
    >>> lm = load_lm("demo-out/experts/python")
    >>> generate(lm, ["def fib("], max_new_tokens=16)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch

from fusekit.errors import FusekitError
from fusekit.lm.load import LoadedLM
from fusekit.lm.score import encode


def prompt_ids(lm: LoadedLM, prompt: str) -> list[int]:
    """``[BOS] + tokens of prompt`` (BOS only when the tokenizer has one)."""
    assert lm.tokenizer is not None
    bos = lm.tokenizer.bos_token_id
    ids = ([bos] if isinstance(bos, int) else []) + encode(lm, prompt)
    if not ids:
        raise FusekitError("the prompt is empty and the tokenizer has no BOS token to start from")
    return ids


def _pick(logits: torch.Tensor, temperature: float, gen: torch.Generator | None) -> torch.Tensor:
    """Greedy (temperature 0) or a sample from softmax(logits / temperature); (batch, vocab) → (batch,)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1).cpu()
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1).to(logits.device)


def _cache_argument(lm: LoadedLM) -> str:
    """transformers 5 calls the KV cache ``cache``; earlier versions ``past_key_values``."""
    params = inspect.signature(lm.model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def generate_ids(lm: LoadedLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 64,
                 temperature: float = 0.0, seed: int = 0, stop_at_eos: bool = True) -> list[list[int]]:
    """New token ids for each prompt (token ids), decoded together with one KV cache.

    Args:
        lm: a loaded model.
        prompts: token ids per prompt (each non-empty).
        max_new_tokens: most tokens added per prompt.
        temperature: 0 for greedy decoding, else sampling from softmax(logits / temperature).
        seed: seeds the sampler (one ``torch.Generator`` for the batch).
        stop_at_eos: stop a prompt after it emits the tokenizer's EOS token (kept in the output).

    Returns:
        The generated ids per prompt (without the prompt).
    """
    if max_new_tokens < 0 or temperature < 0:
        raise FusekitError(f"max_new_tokens ({max_new_tokens}) and temperature ({temperature}) "
                           "must not be negative")
    if not prompts or max_new_tokens == 0:
        return [[] for _ in prompts]
    if any(len(p) == 0 for p in prompts):
        raise FusekitError("a prompt has no tokens; give it text or use a tokenizer with a BOS token")
    eos = lm.tokenizer.eos_token_id if (lm.tokenizer is not None and stop_at_eos) else None
    gen = torch.Generator().manual_seed(seed) if temperature > 0 else None
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, p in enumerate(prompts):  # left padding: every prompt ends at the last column
        ids[row, width - len(p):] = torch.tensor(list(p))
        mask[row, width - len(p):] = 1
    ids, mask = ids.to(lm.device), mask.to(lm.device)
    positions = (mask.cumsum(dim=-1) - 1).clamp(min=0)
    out: list[list[int]] = [[] for _ in prompts]
    done = torch.zeros(len(prompts), dtype=torch.bool)
    cache = None
    cache_arg = _cache_argument(lm)
    step_ids, step_positions = ids, positions
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            result = lm.model(input_ids=step_ids, attention_mask=mask, position_ids=step_positions,
                              use_cache=True, **{cache_arg: cache})
            cache = getattr(result, cache_arg)
            chosen = _pick(result.logits[:, -1], temperature, gen)
            for row, token in enumerate(chosen.tolist()):
                if not done[row]:
                    out[row].append(token)
                    done[row] = eos is not None and token == eos
            if bool(done.all()):
                break
            step_ids = chosen[:, None]
            step_positions = step_positions[:, -1:] + 1
            mask = torch.cat([mask, torch.ones_like(step_ids)], dim=1)
    return out


def generate(lm: LoadedLM, prompts: Sequence[str], *, max_new_tokens: int = 64, temperature: float = 0.0,
             seed: int = 0, stop_at_eos: bool = True, batch_size: int = 8) -> list[str]:
    """Continue each prompt; returns the new text only (special tokens dropped).

    Same arguments as :func:`generate_ids`; ``batch_size`` prompts are decoded together (a
    prompt's greedy continuation does not depend on the batch it is in).
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
