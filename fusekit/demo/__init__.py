"""Demo models and experts for examples, tests and benchmarks; never used by the library's own paths.

* :func:`build_demo_models`: random Llama checkpoints, a base and its "fine-tunes" (torch only).
* :func:`build_demo_experts`: small Llama experts trained on CPU on Python, C and prose, with
  held-out text and router prompts (needs the ``lm`` extra); :func:`load_expert_set` reads them
  back and :func:`evaluate_experts` scores each on each held-out text.
* :func:`build_demo_lora`: one PEFT LoRA adapter per domain over the experts' base (needs the
  ``lora`` extra); :func:`load_lora_set` reads them back, :func:`evaluate_lora` scores them.

Modules: ``models`` (random checkpoints), ``tokenizer`` (the byte-level tokenizer and the trained BPE
ones), ``corpora`` (the experts' text), ``training`` (training runs), ``experts`` (the experts build),
``settings`` (domains and build sizes), ``lora`` (the LoRA adapters build).
"""

from fusekit.demo.experts import Expert, ExpertSet, build_demo_experts, evaluate_experts, load_expert_set
from fusekit.demo.lora import LoraSet, LoraSettings, build_demo_lora, evaluate_lora, load_lora_set
from fusekit.demo.models import build_demo_models
from fusekit.demo.settings import DOMAINS, FULL, QUICK, BuildSizes
from fusekit.demo.tokenizer import TOKENIZER_VOCAB_SIZE

__all__ = ["DOMAINS", "FULL", "QUICK", "TOKENIZER_VOCAB_SIZE", "BuildSizes", "Expert", "ExpertSet", "LoraSet",
           "LoraSettings", "build_demo_experts", "build_demo_lora", "build_demo_models", "evaluate_experts",
           "evaluate_lora", "load_expert_set", "load_lora_set"]
