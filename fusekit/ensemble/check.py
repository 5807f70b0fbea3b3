"""``fusekit ensemble check``: what an ensemble will cost and whether its members fit together,
from configs, tokenizers and safetensors headers only (no weights are loaded)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fusekit.ensemble.align.relative import relative_table_bytes, shared_anchors
from fusekit.ensemble.members import TokenVocab, token_vocab
from fusekit.ensemble.methods import method_spec
from fusekit.ensemble.recipe import EnsembleRecipe, load_ensemble_recipe
from fusekit.io.reader import open_reader
from fusekit.io.refs import ResolvedModel, require_config, resolve_model
from fusekit.io.tokenizer import read_json_object
from fusekit.lm.load import load_tokenizer, tokenizer_folder


def check_ensemble(path: Path | str) -> dict[str, Any]:
    """A compatibility report as a dict: members (vocabulary, tokenizer family, special tokens,
    parameters), vocabulary overlap with the primary, alignment-table memory and cost per token.

    Args:
        path: the ensemble recipe file.

    Returns:
        The report (JSON-ready); ``problems`` lists what would go wrong, empty when all is well.

    Raises:
        FusekitError: the recipe is invalid, or a model or its tokenizer cannot be found.

    Example:
        >>> print(format_report(check_ensemble("configs/ensemble/union.yaml")))  # doctest: +SKIP
    """
    recipe, _ = load_ensemble_recipe(path)
    members: list[dict[str, Any]] = []
    vocabs: list[TokenVocab] = []
    for i, entry in enumerate(recipe.models):
        member, vocab = _member(entry.model)
        members.append({"index": i, "model": entry.model, "weight": round(recipe.weights()[i], 6), **member})
        vocabs.append(vocab)
    primary = vocabs[recipe.primary]
    same = all(v.fingerprint == primary.fingerprint for v in vocabs)
    for m, v in zip(members, vocabs, strict=True):
        both = set(v.by_bytes) & set(primary.by_bytes)
        m["same_tokenizer_as_primary"] = v.fingerprint == primary.fingerprint
        m["shared_spellings_with_primary"] = round(len(both) / max(1, len(set(v.by_bytes))), 4)
    cost = sum(m["parameters"] for m in members)
    report: dict[str, Any] = {
        "recipe": str(path), "method": recipe.method, "primary": recipe.primary, "members": members,
        "one_vocabulary": same,
        "cost_per_token": {"parameters": cost, "flops": 2 * cost,
                           "vs_primary": round(cost / max(1, members[recipe.primary]["parameters"]), 3)},
    }
    if recipe.method == "cascade":
        report["cost_per_token"]["note"] = "cascade runs later members only where earlier ones are unsure"
    anchors = shared_anchors(vocabs, recipe.primary, None)
    union = len({k for v in vocabs for k in v.keys if k is not None})
    params = recipe.params()
    report["alignment"] = {"union_vocab_size": union, "shared_anchors": len(anchors),
                           "relative_table_bytes": relative_table_bytes(
                               [v.width for v in vocabs],
                               min(len(anchors), getattr(params, "max_anchors", None) or len(anchors)))}
    report["problems"] = _problems(recipe, same, report["alignment"]["relative_table_bytes"])
    return report


def _member(ref: str) -> tuple[dict[str, Any], TokenVocab]:
    """One member's entry of the report (parameters, vocabulary, tokenizer) and its byte view."""
    resolved = resolve_model(ref)
    tokenizer = load_tokenizer(ref, tokenizer_folder(resolved))
    config = read_json_object(require_config(resolved, "the ensemble loads the member with it"))
    with open_reader(resolved) as reader:
        params = sum(math.prod(reader.info(name).shape) for name in reader.names())
    width = int(config.get("vocab_size") or len(tokenizer))
    vocab = token_vocab(tokenizer, width)
    return ({"parameters": params, "vocab_size": width, "tokenizer": vocab.family,
             "special_tokens": vocab.special, "context": config.get("max_position_embeddings"),
             "adapter": _adapter_entry(resolved)}, vocab)


def _adapter_entry(resolved: ResolvedModel) -> dict[str, Any] | None:
    """The LoRA adapter a member applies to its base (merged in when loaded), or None."""
    if resolved.adapter is None:
        return None
    return {"adapter": resolved.adapter.ref, "base": resolved.base_ref or str(resolved.folder),
            "r": resolved.adapter.config.r, "lora_alpha": resolved.adapter.config.lora_alpha}


def _problems(recipe: EnsembleRecipe, same: bool, table_bytes: int) -> list[str]:
    """What would go wrong: a method's family against the tokenizers, relative tables over budget."""
    family = method_spec(recipe.method).family
    problems = []
    if family == "same" and not same:
        problems.append(f"method {recipe.method} needs one vocabulary but the tokenizers differ; use "
                        "method: union or relative")
    if family == "cross" and same:
        problems.append(f"all tokenizers are the same; method prob_avg gives what {recipe.method} "
                        "gives, faster")
    if recipe.method == "relative":
        from fusekit.sizes import parse_size

        params = recipe.params()
        budget = parse_size(params.max_table_memory, "parameters.max_table_memory")
        if table_bytes > budget and not params.sparsify:
            problems.append(f"relative tables need {table_bytes} bytes, over max_table_memory "
                            f"{params.max_table_memory}; set sparsify: true or lower max_anchors")
    return problems


def format_report(report: dict[str, Any]) -> str:
    """The report as text for people.

    Args:
        report: what :func:`check_ensemble` returned.

    Returns:
        Several lines: one per member, alignment, cost, and the problems (or ``ok``).
    """
    lines = [f"{report['recipe']}: method {report['method']}, primary {report['primary']}, "
             f"{'one vocabulary' if report['one_vocabulary'] else 'different vocabularies'}"]
    for m in report["members"]:
        same = "same tokenizer as primary" if m["same_tokenizer_as_primary"] else "other tokenizer"
        lines.append(f"  [{m['index']}] {m['model']}: weight {m['weight']:g}, "
                     f"{m['parameters']:,} parameters, vocab {m['vocab_size']} ({m['tokenizer']}), "
                     f"{same}, "
                     + (f"LoRA r={m['adapter']['r']} on {m['adapter']['base']}, " if m.get("adapter") else "")
                     + f"{m['shared_spellings_with_primary']:.0%} spellings shared, specials "
                     + ", ".join(f"{k}={v}" for k, v in m["special_tokens"].items()))
    a, c = report["alignment"], report["cost_per_token"]
    lines.append(f"  alignment: union vocabulary {a['union_vocab_size']}, "
                 f"{a['shared_anchors']} shared anchors, "
                 f"relative tables {a['relative_table_bytes'] / 1e6:.1f} MB")
    lines.append(f"  cost per token: {c['flops']:,} FLOPs, {c['vs_primary']}x the primary")
    lines += [f"  problem: {p}" for p in report["problems"]] or ["  ok"]
    return "\n".join(lines)
