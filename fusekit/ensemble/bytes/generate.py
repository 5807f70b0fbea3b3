"""Generation with ``method: byte``: one byte at a time from the mixed next-byte distribution.

Each step takes the argmax (temperature 0) or a seeded draw from ``softmax(log p / temperature)``
(:func:`fusekit.lm.decode.sample`) among the bytes that keep the answer valid UTF-8, plus the end
symbol; the answer stops at the end symbol (with ``generation.stop_at_eos``) or after ``max_new``
bytes. ``new_tokens`` of the answer counts bytes.
"""

from __future__ import annotations

import torch

from fusekit.ensemble.bytes.beam import EOS
from fusekit.ensemble.bytes.method import ByteMethod
from fusekit.ensemble.members import longest_complete_prefix, utf8_mask
from fusekit.ensemble.results import Answer, GenerationResult
from fusekit.lm.decode import sample

_KEYS: list[bytes | str | None] = [bytes([b]) for b in range(256)]


def _allowed(out: bytes) -> torch.Tensor:
    """``(257,)`` the bytes that keep ``out`` valid UTF-8, and the end symbol (only between characters)."""
    pending = out[longest_complete_prefix(out):]
    return torch.cat([utf8_mask(_KEYS, pending), torch.tensor([not pending])])


def generate_bytes(method: ByteMethod, prompt: str, *, max_new: int, temperature: float,
                   generator: torch.Generator, result: GenerationResult, stop_at_eos: bool = True) -> Answer:
    """Continue ``prompt`` byte by byte with the ``byte`` ensemble.

    Args:
        method: the built ``byte`` method (its members, weights, beam and gate).
        prompt: the prompt text (its bytes are read first).
        max_new: most new bytes.
        temperature: 0 for the most likely byte, else the sampling temperature.
        generator: the sampler's random source.
        result: receives forwarded-token counts and gate statistics.
        stop_at_eos: stop at the end symbol (else it is never chosen).

    Returns:
        The answer (``new_tokens``: bytes written).
    """
    mixer = method.mixer()
    for byte in prompt.encode("utf-8"):
        mixer.advance(byte)
    out = b""
    finished = False
    while len(out) < max_new:
        allowed = _allowed(out)
        if not stop_at_eos:
            allowed[EOS] = False
        probs = torch.where(allowed, mixer.distribution(), torch.zeros((), dtype=torch.float64))
        choice = int(sample(torch.log(probs)[None].float(), temperature, generator)[0])
        if choice == EOS:
            finished = True
            break
        out += bytes([choice])
        mixer.advance(choice)
    for i, beam in enumerate(mixer.beams):
        result.forwarded_tokens[i] += beam.forwards
    result.gated_steps += mixer.gated_steps
    result.ensembled_steps += mixer.ensembled_steps if mixer.gate is not None else 0
    return Answer(prompt, out.decode("utf-8", errors="replace"), len(out), finished)
