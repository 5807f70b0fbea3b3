"""A PEFT LoRA adapter's ``adapter_config.json``, read and checked without importing peft or torch.

Only what changes the weights an adapter produces is kept: rank and alpha (with their per-module
patterns and rsLoRA), which modules it targets, ``fan_in_fan_out``, ``modules_to_save``, the bias
mode and DoRA. Options that would make the adapter compute something fusekit does not apply are
refused with one line naming the option, so an adapter is never applied as if they were absent.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fusekit.errors import CheckpointError
from fusekit.io.files import read_json_object

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_PICKLE = "adapter_model.bin"
MAX_ADAPTER_CONFIG_BYTES = 4 * 2**20  # real ones are a few KiB
BIAS_MODES = ("none", "all", "lora_only")
# Options whose non-empty value changes what the adapter computes in ways fusekit does not apply.
UNSUPPORTED_OPTIONS = ("layer_replication", "target_parameters", "trainable_token_indices",
                       "use_qalora", "megatron_config", "alora_invocation_tokens", "use_bdlora",
                       "arrow_config")


@dataclass(frozen=True)
class LoraConfig:
    """What an adapter's config says about the weights it adds.

    Attributes:
        path: the adapter_config.json this was read from (named in errors).
        r / lora_alpha: the default rank and alpha; ``rank_pattern`` / ``alpha_pattern`` override
            them per module (keys are regexes matched against the end of the module name, as PEFT
            matches them).
        use_rslora: scaling is ``alpha / sqrt(r)`` instead of ``alpha / r``.
        target_modules: module names (matched as name suffixes) or one regex (full match).
        fan_in_fan_out: the base stores the weight transposed (GPT-2's Conv1D); ΔW is transposed.
        modules_to_save: modules the adapter stores whole, replacing the base's.
        bias: ``none``, ``all`` or ``lora_only``: which base biases the adapter stores.
        lora_bias: lora_B has a bias of its own.
        use_dora: DoRA: a per-output magnitude vector rescales the adapted weight.
        base_model: ``base_model_name_or_path``, or None when the adapter does not say.
    """

    path: Path
    r: int
    lora_alpha: float
    use_rslora: bool = False
    target_modules: tuple[str, ...] | str = ()
    fan_in_fan_out: bool = False
    modules_to_save: tuple[str, ...] = ()
    rank_pattern: Mapping[str, int] = field(default_factory=dict)
    alpha_pattern: Mapping[str, float] = field(default_factory=dict)
    bias: str = "none"
    lora_bias: bool = False
    use_dora: bool = False
    base_model: str | None = None

    def rank(self, module: str) -> int:
        """The rank PEFT gives ``module`` (e.g. ``model.layers.0.self_attn.q_proj``)."""
        key = _pattern_key(self.rank_pattern, module)
        return int(self.rank_pattern[key]) if key is not None else self.r

    def alpha(self, module: str) -> float:
        """The alpha PEFT gives ``module``."""
        key = _pattern_key(self.alpha_pattern, module)
        return float(self.alpha_pattern[key]) if key is not None else self.lora_alpha

    def scaling(self, module: str) -> float:
        """The factor ΔW = scaling · B · A uses for ``module``: alpha/r, or alpha/sqrt(r) (rsLoRA)."""
        r = self.rank(module)
        return self.alpha(module) / (math.sqrt(r) if self.use_rslora else r)


def _pattern_key(patterns: Mapping[str, Any], module: str) -> str | None:
    """The first pattern key matching the end of ``module`` on a name boundary, as PEFT picks it."""
    for key in patterns:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


def read_lora_config(folder: Path, *, ref: str | None = None) -> LoraConfig:
    """Read and check ``folder/adapter_config.json``.

    Args:
        folder: the adapter folder.
        ref: the reference as the user wrote it, named in errors (default: the folder).

    Returns:
        The parsed config.

    Raises:
        CheckpointError: one line naming the file and the field: not JSON, not a LoRA adapter
            (LoHa, LoKr, IA3, prompt tuning ... are refused by type), an invalid rank or alpha, or an
            option fusekit does not apply.

    Example:
        >>> read_lora_config(Path("./adapter")).scaling("model.layers.0.self_attn.q_proj")  # doctest: +SKIP
        2.0
    """
    path = folder / ADAPTER_CONFIG
    where = f"adapter '{ref or folder}': {path}"
    raw = read_json_object(path, max_bytes=MAX_ADAPTER_CONFIG_BYTES, kind="an adapter config",
                           fix="save the adapter again", where=where)
    kind = raw.get("peft_type")
    if kind != "LORA":
        raise CheckpointError(f"{where}: PEFT type {str(kind)[:40]!r} is not supported; fusekit applies "
                              "and merges LoRA adapters (peft_type LORA, DoRA included) only")
    for option in UNSUPPORTED_OPTIONS:
        if raw.get(option) not in (None, False, {}, [], ""):
            raise CheckpointError(f"{where}: option '{option}' is set, which fusekit does not apply; "
                                  "merge this adapter into its base with PEFT first")
    return LoraConfig(
        path=path, r=_positive_int(raw.get("r", 8), "r", where),
        lora_alpha=_number(raw.get("lora_alpha", 8), "lora_alpha", where),
        use_rslora=bool(raw.get("use_rslora", False)),
        target_modules=_targets(raw.get("target_modules"), where),
        fan_in_fan_out=bool(raw.get("fan_in_fan_out", False)),
        modules_to_save=_names(raw.get("modules_to_save"), "modules_to_save", where),
        rank_pattern={k: _positive_int(v, f"rank_pattern.{k}", where)
                      for k, v in _mapping(raw.get("rank_pattern"), "rank_pattern", where).items()},
        alpha_pattern={k: _number(v, f"alpha_pattern.{k}", where)
                       for k, v in _mapping(raw.get("alpha_pattern"), "alpha_pattern", where).items()},
        bias=_bias(raw.get("bias", "none"), where), lora_bias=bool(raw.get("lora_bias", False)),
        use_dora=bool(raw.get("use_dora", False)),
        base_model=raw.get("base_model_name_or_path") or None)


def _positive_int(value: Any, key: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{where}: '{key}' must be a positive integer, got {str(value)[:40]}")
    return value


def _number(value: Any, key: str, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise CheckpointError(f"{where}: '{key}' must be a finite number, got {str(value)[:40]}")
    return float(value)


def _mapping(value: Any, key: str, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise CheckpointError(f"{where}: '{key}' must be an object of module pattern → value")
    return value


def _names(value: Any, key: str, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not (isinstance(value, list) and all(isinstance(v, str) for v in value)):
        raise CheckpointError(f"{where}: '{key}' must be a list of module names")
    return tuple(value)


def _targets(value: Any, where: str) -> tuple[str, ...] | str:
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as exc:
            raise CheckpointError(f"{where}: 'target_modules' is not a valid regex ({exc})") from None
        return value
    return _names(value, "target_modules", where)


def _bias(value: Any, where: str) -> str:
    if value not in BIAS_MODES:
        raise CheckpointError(f"{where}: 'bias' must be one of {', '.join(BIAS_MODES)}, got "
                              f"{str(value)[:40]!r}")
    return str(value)
