"""Router (gate) initialisation for an upcycled MoE: one ``[experts, hidden]`` matrix per layer.

``hidden``: run the base model on each prompt, take every layer's input hidden state at the last
token, average over an expert's positive prompts, subtract the average over its negative prompts,
normalise to unit length. An empty prompt is the BOS token alone (what mergekit-moe feeds the model
for ``""``), so its row is the hidden state (or embedding) of the start of a text.
``cheap_embed``: the same with the prompts' mean token embedding (no
forward pass), one vector for every layer. ``random``: standard normal entries. ``uniform_random``:
``U(-1/sqrt(hidden), 1/sqrt(hidden))``, torch's default for a linear layer. Random gates draw from a
generator seeded by (seed, router tensor name), so a seed gives the same gates on any device.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from fusekit.errors import CheckpointError, RecipeError
from fusekit.io.reader import open_reader
from fusekit.io.refs import ResolvedModel
from fusekit.moe.recipe import Expert
from fusekit.ops import seeded_generator
from fusekit.progress import steps

log = logging.getLogger("fusekit")
PARALLEL_COSINE = 0.98  # gate rows this aligned barely separate their experts


def random_gates(mode: str, names: Sequence[str], experts: int, hidden: int, seed: int
                 ) -> list[torch.Tensor]:
    """One ``[experts, hidden]`` float32 matrix per router name, seeded by (seed, name)."""
    gates = []
    for name in names:
        generator = seeded_generator(seed, name, 0)
        if mode == "random":
            gates.append(torch.randn(experts, hidden, generator=generator))
        else:
            bound = 1.0 / math.sqrt(hidden)
            gates.append(torch.rand(experts, hidden, generator=generator) * (2 * bound) - bound)
    return gates


def prompt_gates(mode: str, base_ref: str, base: ResolvedModel, experts: Sequence[Expert], *,
                 layers: int, embedding: str, device: str) -> list[torch.Tensor]:
    """``hidden`` or ``cheap_embed`` gates: ``layers`` matrices of shape ``[len(experts), hidden]``."""
    from fusekit.lm.load import load_tokenizer

    tokenizer = load_tokenizer(base_ref, base.folder)

    def token_ids(owner: str, prompt: str) -> list[int]:
        ids = list(tokenizer(prompt)["input_ids"])
        if not ids and tokenizer.bos_token_id is not None:  # "": the start of a text, as mergekit reads it
            ids = [tokenizer.bos_token_id]
        if not ids:
            raise RecipeError(f"{owner}: prompt {prompt!r} gives no tokens with the base model's "
                              "tokenizer (an empty prompt stands for its BOS token, and it has none); "
                              "use a longer prompt")
        return ids

    features: Callable[[str, str], torch.Tensor]  # (owner, prompt) -> (layers, hidden)
    if mode == "hidden":
        features = _hidden_features(base_ref, device, token_ids)
    else:
        features = _embedding_features(base, embedding, layers, token_ids)
    total = sum(len(e.positive_prompts or []) + len(e.negative_prompts or []) for e in experts)
    with steps(f"gates: {mode} states of {total} prompts", total=total, unit="prompt") as advance:
        def counted(owner: str, prompt: str) -> torch.Tensor:
            out = features(owner, prompt)
            advance(1)
            return out

        rows = [_gate_row(index, expert, counted) for index, expert in enumerate(experts)]
    stacked = torch.stack(rows, dim=1)  # (layers, experts, hidden)
    warn_if_parallel(stacked)
    return list(stacked.unbind(0))


def _gate_row(index: int, expert: Expert, features: Callable[[str, str], torch.Tensor]) -> torch.Tensor:
    """``(layers, hidden)``: the unit-length mean of the expert's positive prompts' states less that
    of its negative prompts."""
    owner = f"experts[{index}] ({expert.source_model})"
    vector = _mean([features(owner, p) for p in expert.positive_prompts or []])
    if expert.negative_prompts:
        vector = vector - _mean([features(owner, p) for p in expert.negative_prompts])
    norms = vector.norm(dim=-1, keepdim=True)
    if bool((norms < 1e-12).any()):
        raise RecipeError(f"{owner}: the positive and negative prompts give the same average "
                          "hidden state, so the gate has no direction; change the prompts")
    return vector / norms


def _mean(vectors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack(vectors).to(torch.float64).mean(dim=0)


def _hidden_features(base_ref: str, device: str, token_ids: Callable[[str, str], list[int]]
                     ) -> Callable[[str, str], torch.Tensor]:
    from fusekit.device import resolve_device
    from fusekit.lm.load import load_lm

    target = resolve_device(device)
    lm = load_lm(base_ref, device=str(target), dtype="float32" if target.type == "cpu" else None,
                 tokenizer=False)

    def features(owner: str, prompt: str) -> torch.Tensor:
        ids = torch.tensor([token_ids(owner, prompt)], device=lm.device)
        with torch.no_grad():
            out = lm.model(input_ids=ids, output_hidden_states=True, use_cache=False)
        # hidden_states[l] is the input of layer l; the last entry is the final norm's input.
        return torch.stack([h[0, -1].float().cpu() for h in out.hidden_states[:-1]])

    return features


def _embedding_features(base: ResolvedModel, embedding: str, layers: int,
                        token_ids: Callable[[str, str], list[int]]) -> Callable[[str, str], torch.Tensor]:
    reader = open_reader(base)
    vocab = reader.info(embedding).shape[0]

    def features(owner: str, prompt: str) -> torch.Tensor:
        ids = token_ids(owner, prompt)
        if max(ids) >= vocab:
            raise CheckpointError(f"{owner}: the tokenizer gives token id {max(ids)} but "
                                  f"'{embedding}' has only {vocab} rows")
        rows = [reader.get(embedding, (i, i + 1)).float() for i in ids]
        return torch.cat(rows).mean(dim=0).expand(layers, -1)

    return features


def warn_if_parallel(gates: torch.Tensor, threshold: float = PARALLEL_COSINE) -> list[int]:
    """Log one line naming the layers whose gate rows (``gates``: layers × experts × hidden) have
    a pair with cosine similarity above ``threshold``; return those layers."""
    unit = gates / gates.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    cosine = unit @ unit.transpose(1, 2)  # (layers, experts, experts)
    cosine = cosine - 2 * torch.eye(gates.shape[1], dtype=cosine.dtype)  # ignore the diagonal
    worst = cosine.flatten(1).max(dim=1).values
    layers = [i for i, value in enumerate(worst.tolist()) if value > threshold]
    if layers:
        shown = ", ".join(map(str, layers[:8])) + (", ..." if len(layers) > 8 else "")
        log.warning("gate rows are nearly parallel (cosine up to %.3f) at %d of %d layers (%s): the "
                    "experts' prompts are too similar to route between them; give each expert "
                    "more distinct prompts", float(worst.max()), len(layers), gates.shape[0], shown)
    return layers


def save_gates(tensors: dict[str, torch.Tensor], folder: Path) -> ResolvedModel:
    """Write computed tensors as a safetensors checkpoint that the executor reads like a model."""
    from safetensors.torch import save_file

    path = folder / "gates.safetensors"
    save_file({name: t.to(torch.float32).contiguous() for name, t in tensors.items()}, str(path))
    return ResolvedModel(ref="<gates>", folder=folder, weight_files=(path,))
