"""Random PEFT LoRA adapters over a tiny base, for tests that need real adapter folders."""

from __future__ import annotations

from pathlib import Path

import torch


def make_peft_adapter(base: Path, out: Path, *, seed: int, targets: list[str]) -> Path:
    """Save a rank-4 LoRA adapter (alpha 8) over ``base`` with random, non-zero B (so it changes the
    model) on the ``targets`` modules into ``out``; returns ``out``."""
    import peft
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    peft.get_peft_model(model, config).save_pretrained(out)
    return out
