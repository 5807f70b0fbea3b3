"""Arrow routing (``router: arrow``): LoRA adapters of one base, with every token in every adapted
layer sent to the adapters whose ΔW best matches it. PEFT runs it (``peft.ArrowConfig``,
``peft.tuners.lora.arrow.create_arrow_model``; Ostapenko et al. 2024, "Towards Modular LLMs by
Building and Reusing a Library of LoRAs"; GenKnowSub: Bagherifard et al. 2025).

In each adapted linear layer PEFT takes, per adapter ``e``, the top right singular vector ``v_e`` of
``ΔW_e = B_e A_e`` (its prototype), scores a token ``x`` by ``|x · v_e|``, keeps the ``top_k`` best
and mixes those adapters' outputs with weights ``softmax(score / router_temperature)``. No data and no
training: the prototypes come from the adapter weights when the model loads.

fusekit adds what PEFT lacks: the recipe checks (adapters only, over one base), a router folder like
every other router's (``router.json`` with the settings and the adapters, a card, the recipe; no
tensors), a loaded model that ``fusekit score``, ``route run`` (and ``--generate``) and ``route eval``
use like any other model, and the routing weights per query, which PEFT does not expose.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fusekit.errors import FusekitError
from fusekit.io.files import write_json, write_text
from fusekit.io.refs import ResolvedModel, resolve_model
from fusekit.lm.load import LoadedLM
from fusekit.route.data import Example
from fusekit.route.labels import column_from_scores, scored_texts
from fusekit.route.recipe import ArrowRouter, RouteRecipe
from fusekit.route.router import (
    CONFIG_FILE,
    FORMAT,
    FORMAT_VERSION,
    RoutedModel,
    RouterFolderError,
    read_router_config,
    router_type,
)
from fusekit.version import __version__

ARROW_LAYER = "ArrowLoraLinearLayer"  # the class of PEFT's per-layer Arrow router
SETTINGS = ("top_k", "router_temperature", "use_gks", "rng_seed")


class ArrowError(FusekitError, ValueError):
    """An Arrow router cannot be built or loaded over the models given."""


@dataclass
class Arrow:
    """An Arrow router: the adapters it mixes, their shared base and PEFT's Arrow settings.

    Attributes:
        models: the task adapters, in recipe order (``folder`` is ``base_folder+adapter_folder``).
        base: the shared base model's folder.
        top_k: adapters mixed per token and layer.
        router_temperature: the softmax temperature of the mixing weights.
        use_gks: subtract the mean of ``gks_adapters`` from every task adapter first (GenKnowSub).
        rng_seed: seeds PEFT's power iteration for the prototypes.
        gks_adapters: the general adapters' references (``base+adapter`` folders).
        info: anything else saved in ``router.json`` (the build summary).
    """

    models: list[RoutedModel]
    base: str
    top_k: int
    router_temperature: float
    use_gks: bool = False
    rng_seed: int = 0
    gks_adapters: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The adapters' names, in recipe order."""
        return [m.name for m in self.models]

    def settings(self) -> dict[str, Any]:
        """The settings PEFT's ``ArrowConfig`` takes, by name."""
        return {key: getattr(self, key) for key in SETTINGS}


def shared_base(refs: Sequence[str], resolved: Sequence[ResolvedModel], key: str = "models") -> Path:
    """The one base folder all of ``resolved`` are LoRA adapters over.

    Args:
        refs: the references as written (for messages).
        resolved: each reference resolved.
        key: the recipe key the references come from (for messages).

    Returns:
        The base folder, resolved.

    Raises:
        ArrowError: one is a full model, or two adapters name different bases (one line naming them).
    """
    bases: dict[Path, str] = {}
    for index, (ref, model) in enumerate(zip(refs, resolved, strict=True)):
        if model.adapter is None:
            raise ArrowError(f"{key}[{index}] '{ref}' is a full model: router: arrow routes among LoRA "
                             "adapters over one base; give 'base+adapter' or a PEFT adapter folder")
        bases.setdefault(model.folder.resolve(), ref)
    if len(bases) > 1:
        (first, a), (second, b) = list(bases.items())[:2]
        raise ArrowError(f"router: arrow mixes adapters of one base, but '{a}' is over {first} and "
                         f"'{b}' over {second}; use adapters trained on the same base")
    return next(iter(bases))


def _adapter_folder_ref(model: ResolvedModel) -> str:
    assert model.adapter is not None
    return f"{model.folder.resolve()}+{model.adapter.folder.resolve()}"


def build_arrow(parsed: RouteRecipe, resolved: Sequence[ResolvedModel]) -> Arrow:
    """The Arrow router an ``router: arrow`` recipe describes (nothing is fitted or loaded).

    Args:
        parsed: the recipe (its ``router`` is an :class:`~fusekit.route.recipe.ArrowRouter`).
        resolved: its ``models`` resolved, in order.

    Returns:
        The :class:`Arrow` to save.

    Raises:
        ArrowError: a model is not a LoRA adapter, or the adapters (``gks_adapters`` too) name
            different bases.
    """
    spec = parsed.router
    assert isinstance(spec, ArrowRouter)
    gks = [resolve_model(ref) for ref in spec.gks_adapters]
    base = shared_base([m.model for m in parsed.models], resolved)
    if gks:
        shared_base([*(m.model for m in parsed.models), *spec.gks_adapters], [*resolved, *gks],
                    key="models + router.gks_adapters")
    models = [RoutedModel(m.label, m.model, _adapter_folder_ref(r), m.cost, 0.0)
              for m, r in zip(parsed.models, resolved, strict=True)]
    return Arrow(models, str(base), spec.top_k, spec.router_temperature, spec.use_gks, int(spec.rng_seed),
                 [_adapter_folder_ref(r) for r in gks],
                 {"training": {"examples": 0, "labels": "none (Arrow needs no data)"}})


def save_arrow(arrow: Arrow, folder: Path, *, name: str | None = None,
               recipe_text: str | None = None) -> None:
    """Write ``arrow`` into the (empty, usually temporary) ``folder``: ``router.json``, the card
    ``README.md`` and the recipe ``route.yaml``; ``name`` titles the card."""
    from fusekit.io.manifest import with_digests

    config = {"format": FORMAT, "format_version": FORMAT_VERSION, "fusekit_version": __version__,
              "models": [vars(m) for m in arrow.models], "base": arrow.base, "features": None,
              "router": {"type": "arrow", "n_models": len(arrow.models), **arrow.settings(),
                         "gks_adapters": arrow.gks_adapters},
              **arrow.info}
    write_text(folder / "README.md", arrow_card(name or folder.name, arrow, recipe_text))
    if recipe_text is not None:
        write_text(folder / "route.yaml", recipe_text)
    write_json(folder / CONFIG_FILE, with_digests(folder, CONFIG_FILE, config, ["route.yaml"]))


def arrow_card(name: str, arrow: Arrow, recipe_text: str | None) -> str:
    """README.md of an Arrow router folder: metadata, the adapters, the settings, the recipe."""
    import yaml

    front = yaml.safe_dump({"library_name": "fusekit", "tags": ["router", "arrow", "lora", "fusekit"],
                            "pipeline_tag": "text-generation"}, sort_keys=False).strip()
    gks = f" after subtracting the mean of {len(arrow.gks_adapters)} general adapter(s) (GenKnowSub)" \
        if arrow.use_gks else ""
    lines = ["---", front, "---", "", f"# {name}", "",
             f"An Arrow router made with fusekit {__version__} over {len(arrow.models)} LoRA adapters of "
             f"the base `{arrow.base}`: in every adapted layer each token goes to the {arrow.top_k} "
             f"adapter(s) whose top singular direction best matches it{gks}, mixed by a softmax at "
             f"temperature {arrow.router_temperature:g} (PEFT's `ArrowConfig`). Use it with "
             "`fusekit route run`, `fusekit route eval` and `fusekit score`.", "",
             "## Adapters", "", "| adapter | reference |", "|---|---|",
             *[f"| `{m.name}` | `{m.ref}` |" for m in arrow.models]]
    if recipe_text is not None:
        lines += ["", "## Recipe", "", "```yaml", recipe_text.strip(), "```"]
    return "\n".join(lines) + "\n"


def load_arrow(folder: Path | str) -> Arrow:
    """Read an Arrow router folder written by ``fusekit route build``.

    Args:
        folder: the router folder.

    Returns:
        The :class:`Arrow` (no model is loaded: see :func:`load_arrow_lm`).

    Raises:
        RouterFolderError: the folder is not a fusekit router, was changed, or is not an Arrow router.

    Example:
        >>> load_arrow("./arrow-router").names  # doctest: +SKIP
        ['python', 'c', 'prose']
    """
    config = read_router_config(folder)
    if router_type(config) != "arrow":
        raise RouterFolderError(f"'{folder}' is a {router_type(config)} router, not an Arrow router")
    try:
        settings = config["router"]
        return Arrow([RoutedModel(**m) for m in config["models"]], str(config["base"]),
                     int(settings["top_k"]), float(settings["router_temperature"]), bool(settings["use_gks"]),
                     int(settings["rng_seed"]), [str(g) for g in settings["gks_adapters"]],
                     {k: v for k, v in config.items() if k == "training"})
    except (KeyError, TypeError, ValueError) as exc:
        raise RouterFolderError(f"'{folder}' is not a fusekit router folder: {CONFIG_FILE} is incomplete "
                                f"({exc!r}); rebuild it") from None


def load_arrow_lm(arrow: Arrow, *, device: str = "cpu", dtype: str | None = "float32") -> LoadedLM:
    """The base with every adapter loaded beside it and PEFT's Arrow router active, as a model
    ``score``, ``generate`` and the ensembles run like any other.

    Args:
        arrow: the router.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: the load dtype (see :func:`fusekit.lm.load.load_lm`).

    Returns:
        A :class:`~fusekit.lm.load.LoadedLM` whose ``model`` is the base with PEFT's LoRA layers
        holding every adapter (unmerged) and the Arrow router active.

    Raises:
        ArrowError: an adapter no longer resolves to one base, or PEFT refuses the adapters (ranks,
            shapes or target modules differ); one line.
    """
    from fusekit.lm.load import check_weights, import_peft, load_lm, load_tokenizer, tokenizer_folder

    refs = [m.reference() for m in arrow.models]
    resolved = [resolve_model(ref) for ref in refs]
    gks = [resolve_model(ref) for ref in arrow.gks_adapters]
    base = shared_base([*refs, *arrow.gks_adapters], [*resolved, *gks])
    for model in [*resolved, *gks]:
        check_weights(model)
    lm = load_lm(str(base), device="cpu", dtype=dtype, tokenizer=False)
    peft = import_peft()
    try:
        from peft import ArrowConfig
        from peft.tuners.lora.arrow import create_arrow_model
    except ImportError:
        raise ArrowError(f"router: arrow needs a peft with Arrow (ArrowConfig); peft {peft.__version__} "
                         "lacks it: pip install -U peft") from None

    config = ArrowConfig(top_k=arrow.top_k, router_temperature=arrow.router_temperature,
                         use_gks=arrow.use_gks, rng_seed=arrow.rng_seed)
    try:
        with warnings.catch_warnings():  # PEFT's loader warns about transformers' deprecations
            warnings.simplefilter("ignore", FutureWarning)
            peft_model = create_arrow_model(lm.model, [str(_adapter(r)) for r in resolved], config,
                                            general_adapter_paths=[str(_adapter(r)) for r in gks] or None)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ArrowError(f"router: arrow over {', '.join(arrow.names)}: PEFT cannot build it: {first}; "
                         "Arrow needs adapters of equal rank on the same linear modules") from None
    from fusekit.device import resolve_device

    target = resolve_device(device)
    # The transformers model inside runs its LoRA layers with the Arrow router active, and keeps its
    # own forward signature (the decoder reads it to pass the KV cache).
    model = peft_model.get_base_model().to(target).eval()
    tok = load_tokenizer(refs[0], tokenizer_folder(resolved[0]))
    return dataclasses.replace(lm, ref=f"arrow({', '.join(arrow.names)})", model=model, tokenizer=tok,
                               device=target)


def _adapter(model: ResolvedModel) -> Path:
    assert model.adapter is not None
    return model.adapter.folder


def arrow_layers(lm: LoadedLM) -> list[torch.nn.Module]:
    """PEFT's per-layer Arrow routers inside ``lm.model`` (one per adapted linear module)."""
    return [m for m in lm.model.modules() if type(m).__name__ == ARROW_LAYER]


def token_coefficients(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """``(tokens, n_adapters)`` the mixing weights ``layer`` gives the tokens ``x`` ``(..., in)``:
    ``softmax(top_k(|x · v_e|) / temperature)`` over the adapters' prototypes ``v_e`` (zero outside
    the top k), as PEFT's Arrow layer computes them in its forward."""
    prototypes = layer.prototypes  # (n_adapters, in)
    tok = x.reshape(-1, x.shape[-1]).to(prototypes.dtype)
    sim = (tok @ prototypes.T).abs()  # (tokens, n_adapters)
    top, index = torch.topk(sim, int(layer.top_k), dim=1)
    full = torch.full_like(sim, float("-inf")).scatter(1, index, top)
    return torch.softmax(full / float(layer.temperature), dim=1)


def routing_weights(lm: LoadedLM, texts: Sequence[str], *, batch_size: int = 8,
                    max_tokens: int = 256) -> torch.Tensor:
    """Each adapter's mean Arrow weight per text, over its tokens and every adapted layer.

    Args:
        lm: a model from :func:`load_arrow_lm`.
        texts: the texts (read as ``fusekit score`` reads them: BOS, then the tokens).
        batch_size: texts per forward pass.
        max_tokens: tokens of each text looked at (its start).

    Returns:
        ``(n_texts, n_adapters)`` float64; rows sum to 1.
    """
    from fusekit.lm.generate import prompt_ids

    layers = arrow_layers(lm)
    captured: list[torch.Tensor] = []
    handles = [layer.register_forward_hook(
        lambda module, args, _out: captured.append(token_coefficients(module, args[0]))) for layer in layers]
    rows = []
    try:
        for lo in range(0, len(texts), batch_size):
            seqs = [prompt_ids(lm, t)[:max_tokens] for t in texts[lo:lo + batch_size]]
            width = max(len(s) for s in seqs)
            ids = torch.zeros(len(seqs), width, dtype=torch.long)
            mask = torch.zeros(len(seqs), width, dtype=torch.long)
            for row, seq in enumerate(seqs):
                ids[row, :len(seq)], mask[row, :len(seq)] = torch.tensor(seq), 1
            captured.clear()
            with torch.inference_mode():
                lm.model(input_ids=ids.to(lm.device), attention_mask=mask.to(lm.device), use_cache=False)
            coeff = torch.stack(captured).double().cpu().view(len(layers), len(seqs), width, -1)
            summed = (coeff * mask[None, :, :, None]).sum(dim=(0, 2))  # (texts, n_adapters)
            rows.append(summed / summed.sum(dim=1, keepdim=True))
    finally:
        for handle in handles:
            handle.remove()
    return torch.cat(rows)


def score_arrow(lm: LoadedLM, examples: Sequence[Example], *, batch_size: int = 8,
                context: int | None = None, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Arrow model's ``(nll_bits, n_bytes)`` over ``examples`` (both ``(n,)`` float64), scored as
    :func:`fusekit.route.labels.score_column` scores one model.

    Args:
        lm: a model from :func:`load_arrow_lm`.
        examples: the examples.
        batch_size: windows per forward pass.
        context: longest scoring window in tokens (default: the model's, at most 1024).
        desc: what the progress bar says.
    """
    from fusekit.lm.score import score_texts

    scores = score_texts(lm, scored_texts(examples), context=context, batch_size=batch_size,
                         desc=desc or f"scoring {len(examples)} examples with Arrow")
    return column_from_scores(examples, [s.nll_nats for s in scores])

