"""A trained router: features + router + cost order + threshold, saved as a folder.

The folder holds ``router.safetensors`` (feature statistics, router weights, the held-out values the
threshold was calibrated on), ``router.json`` (everything else: models and costs, settings, training
summary) and ``README.md``, a model card naming the models. :func:`load_router` reads it back;
``fusekit route run`` and ``fusekit route eval`` both use it.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from fusekit.errors import FusekitError
from fusekit.io.files import write_json, write_text
from fusekit.route.features import Featurizer, Tfidf, restore_featurizer
from fusekit.route.fitted import FittedRouter, one_thread
from fusekit.route.policy import calibrate, choose, choose_one, dear_share_tail
from fusekit.version import __version__

FORMAT = "fusekit-router"
FORMAT_VERSION = 1
CONFIG_FILE = "router.json"
WEIGHTS_FILE = "router.safetensors"


class RouterFolderError(FusekitError, ValueError):
    """A folder given as a router is not one fusekit wrote."""


@dataclass(frozen=True)
class RoutedModel:
    """A model the router can choose: its name, reference as written, resolved folder and cost.

    Attributes:
        name: the model's name in the recipe (its ``name``, else the reference).
        ref: the reference as the recipe wrote it (a folder or ``org/name@rev``).
        folder: the local folder it resolved to when the router was built (``base+adapter`` folders
            for a LoRA adapter).
        cost: its relative cost per call, from the recipe.
        strength: the share of the training examples it was the best model for.
    """

    name: str
    ref: str
    folder: str
    cost: float
    strength: float

    def reference(self) -> str:
        """Where to load the model from now.

        Returns:
            ``ref`` when it still resolves from here, else the folder it resolved to at build time.
        """
        from fusekit.io.refs import hub_repo_id

        if Path(self.ref).expanduser().exists() or hub_repo_id(self.ref) is not None:
            return self.ref
        return self.folder


@dataclass(frozen=True)
class Decision:
    """Where one query goes.

    Attributes:
        model: the chosen model.
        index: its position in the router's ``models``.
        probabilities: every model's probability of being the best for the query, by name (for an
            Arrow router: each adapter's mean mixing weight over the query's tokens and layers).
        threshold: the threshold the decision was made at (None for an Arrow router).
    """

    model: RoutedModel
    index: int
    probabilities: dict[str, float]
    threshold: float | None


@dataclass
class Router:
    """A router ready to run: features, a fitted router, the models in cost order and a threshold.

    :func:`load_router` reads one from the folder ``fusekit route build`` wrote; :meth:`route` sends
    one query to a model, :meth:`route_indices` many at once.

    Attributes:
        models: the models it routes to, in recipe order.
        featurizer: turns queries into feature rows.
        fitted: the learned part: feature rows → each model's probability of being the best.
        order: model indices from cheapest to dearest.
        n_cheap: how many models share the lowest cost (the first ``n_cheap`` of ``order``).
        threshold: from 0 (every query to the dearest model) to 1 (every query to the cheapest).
        calibration_tail: the held-out values the threshold was calibrated on (empty: none).
        info: labels, training and calibration summaries, as saved in ``router.json``.

    Example:
        >>> router = load_router("./router")  # doctest: +SKIP
        >>> router.route("def main():").model.name  # doctest: +SKIP
        'python'
    """

    models: list[RoutedModel]
    featurizer: Featurizer
    fitted: FittedRouter
    order: list[int]
    n_cheap: int
    threshold: float
    calibration_tail: torch.Tensor
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        """The models' names, in recipe order."""
        return [m.name for m in self.models]

    def probabilities(self, queries: Sequence[str]) -> torch.Tensor:
        """Each model's probability of being the best for each query.

        Args:
            queries: the query texts.

        Returns:
            ``(n_queries, n_models)`` float32; rows sum to 1.
        """
        if len(self.models) == 1:
            return torch.ones(len(queries), 1)
        if self.fitted.kind == "knn" and isinstance(self.featurizer, Tfidf):
            return self.fitted.probabilities(self.featurizer.sparse_rows(queries))
        return self.fitted.probabilities(self.featurizer.transform(queries))

    def route_indices(self, queries: Sequence[str], *, threshold: float | None = None) -> torch.Tensor:
        """Route many queries at once.

        Args:
            queries: the query texts.
            threshold: overrides the router's threshold.

        Returns:
            ``(n_queries,)`` int64: the index in ``models`` of the model each query goes to.
        """
        t = self.threshold if threshold is None else threshold
        return choose(self.probabilities(queries), self.order, t)

    def route(self, query: str, *, threshold: float | None = None) -> Decision:
        """Route one query (on one thread: for a single query that is fastest).

        Args:
            query: the query text.
            threshold: overrides the router's threshold.

        Returns:
            The :class:`Decision`: the chosen model and every model's probability.
        """
        t = self.threshold if threshold is None else threshold
        with one_thread():  # a parallel region waits on a second thread: on a busy CPU, milliseconds
            q = self.probabilities([query])[0].tolist()
        index = choose_one(q, self.order, t)
        return Decision(self.models[index], index, dict(zip(self.names, q, strict=True)), t)

    def dear_tail(self, q: torch.Tensor) -> torch.Tensor:
        """Per query, the value that must exceed the threshold for it to leave the cheapest models.

        Args:
            q: ``(n, n_models)`` probabilities from :meth:`probabilities`.

        Returns:
            ``(n,)`` float64.
        """
        return dear_share_tail(q, self.order, self.n_cheap)

    def threshold_for_share(self, share: float) -> float:
        """The threshold that sends ``share`` of the held-out build queries to dearer models.

        Args:
            share: the wanted share of calls to models dearer than the cheapest, in [0, 1].

        Returns:
            The threshold, in [0, 1].

        Raises:
            FusekitError: the router holds no held-out values (built with ``folds: 0``).
        """
        if self.calibration_tail.numel() == 0:
            raise FusekitError("this router was built with folds: 0, so it holds no held-out "
                               "predictions to calibrate on; rebuild it with folds >= 2")
        return calibrate(self.calibration_tail, share)

    def dear_indices(self) -> list[int]:
        """Indices of the models dearer than the cheapest, cheapest first."""
        return list(self.order[self.n_cheap:])


def save_router(router: Router, folder: Path, *, name: str | None = None,
                recipe_text: str | None = None) -> None:
    """Write ``router`` into the (empty, usually temporary) ``folder``; ``name`` titles its card."""
    tensors = {name: t.contiguous() for name, t in router.featurizer.tensors().items()}
    tensors.update({f"router.{name}": t.contiguous() for name, t in router.fitted.params.items()})
    tensors["calibration.tail"] = router.calibration_tail.double().contiguous()
    save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": FORMAT})
    config = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fusekit_version": __version__,
        "models": [vars(m) for m in router.models],
        "order": router.order, "n_cheap": router.n_cheap, "threshold": router.threshold,
        "features": router.featurizer.settings(),
        "router": {"type": router.fitted.kind, "n_models": router.fitted.n_models,
                   **router.fitted.settings},
        **router.info,
    }
    write_text(folder / "README.md", router_card(name or folder.name, router, recipe_text))
    if recipe_text is not None:
        write_text(folder / "route.yaml", recipe_text)
    from fusekit.io.manifest import with_digests  # router.json last: it records the others' sha256

    write_json(folder / CONFIG_FILE, with_digests(folder, CONFIG_FILE, config, [WEIGHTS_FILE, "route.yaml"]))


def router_card(name: str, router: Router, recipe_text: str | None) -> str:
    """README.md: metadata, the models with their costs, how the router was built and calibrated."""
    import yaml

    from fusekit.io.refs import hub_repo_id

    hub = [h for h in (hub_repo_id(m.ref) for m in router.models) if h]
    front = yaml.safe_dump({"base_model": hub, "library_name": "fusekit", "tags": ["router", "fusekit"],
                            "pipeline_tag": "text-generation"}, sort_keys=False).strip()
    features = router.featurizer.settings()
    training = router.info.get("training", {})
    calibration = router.info.get("calibration", {})
    lines = ["---", front, "---", "", f"# {name}", "",
             f"A query router made with fusekit {__version__}: `{router.fitted.kind}` over "
             f"`{features['type']}` features chooses which of {len(router.models)} model(s) answers "
             "each query. Run it with `fusekit route run` and measure it with `fusekit route eval`.", "",
             "## Models", "", "| model | reference | cost | best on (training share) |", "|---|---|---|---|",
             *[f"| `{m.name}` | `{m.ref}` | {m.cost:g} | {m.strength:.1%} |" for m in router.models], "",
             "## Routing", "",
             f"Cheapest to dearest: {', '.join(router.models[i].name for i in router.order)}. "
             f"Threshold {router.threshold:.4f}"]
    if calibration.get("share") is not None:
        lines[-1] += f", calibrated to send {calibration['share']:.0%} of calls to dearer models"
    lines[-1] += "."
    if training:
        lines += ["", f"Trained on {training.get('examples')} examples labelled by "
                  f"`{training.get('labels')}`; held-out routing accuracy "
                  f"{training.get('heldout_accuracy', float('nan')):.1%} "
                  f"({training.get('folds')}-fold cross-validation)."]
    if recipe_text is not None:
        lines += ["", "## Recipe", "", "```yaml", recipe_text.strip(), "```"]
    return "\n".join(lines) + "\n"


def read_router_config(folder: Path | str) -> dict[str, Any]:
    """The checked ``router.json`` of a router folder (any kind, Arrow too).

    Args:
        folder: the router folder.

    Returns:
        The parsed config, after its format, version and the recorded file digests are checked.

    Raises:
        RouterFolderError: the folder is missing, is not a fusekit router, or its files were changed.
    """
    folder = Path(folder)
    not_router = f"'{folder}' is not a fusekit router folder"
    if not folder.is_dir():
        raise RouterFolderError(f"{not_router}: no such folder; build one with fusekit route build")
    try:
        config = json.loads((folder / CONFIG_FILE).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RouterFolderError(f"{not_router} (no {CONFIG_FILE}); build one with fusekit route "
                                "build") from None
    except (ValueError, UnicodeDecodeError):
        raise RouterFolderError(f"{not_router}: {CONFIG_FILE} is not valid JSON; rebuild it") from None
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise RouterFolderError(f"{not_router}: {CONFIG_FILE} lacks \"format\": \"{FORMAT}\"; build "
                                "one with fusekit route build")
    if config.get("format_version", 0) > FORMAT_VERSION:
        raise RouterFolderError(f"'{folder}' was written by a newer fusekit "
                                f"({config.get('fusekit_version')}); upgrade fusekit to read it")
    from fusekit.io.manifest import digest_mismatch  # README.md is the card: editing it is fine

    if (mismatch := digest_mismatch(folder, CONFIG_FILE, config)) is not None:
        raise RouterFolderError(f"{mismatch}; rebuild the router with fusekit route build")
    return config


def router_type(config: dict[str, Any]) -> str | None:
    """The ``router.type`` a router config names (``knn``, ..., ``arrow``), or None."""
    router = config.get("router")
    return router.get("type") if isinstance(router, dict) else None


def is_arrow_router(folder: Path | str) -> bool:
    """Whether ``folder`` is an Arrow router folder (a checked router config of type ``arrow``).

    Raises:
        RouterFolderError: as :func:`read_router_config`.
    """
    return router_type(read_router_config(folder)) == "arrow"


def load_router(folder: Path | str, *, device: str = "cpu") -> Router:
    """Read a router folder written by ``fusekit route build`` (a router that picks one model per
    query; an Arrow router is read by :func:`fusekit.route.arrow.load_arrow`).

    Args:
        folder: the router folder.
        device: where the featurizer's model runs, for ``hidden``/``embedding`` features.

    Returns:
        The :class:`Router`, ready to route.

    Example:
        >>> load_router("./router").route("int main(void) {").model.name  # doctest: +SKIP
        'c'

    Raises:
        RouterFolderError: the folder is missing or is not a fusekit router, or is an Arrow router.
    """
    folder = Path(folder)
    not_router = f"'{folder}' is not a fusekit router folder"
    config = read_router_config(folder)
    if router_type(config) == "arrow":
        raise RouterFolderError(f"'{folder}' is an Arrow router: it routes each token inside the model, "
                                "so it has no per-query choice or threshold; use it with route run, "
                                "route eval or fusekit score")
    try:
        tensors = load_file(str(folder / WEIGHTS_FILE))
    except (FileNotFoundError, SafetensorError, OSError) as exc:
        raise RouterFolderError(f"{not_router}: cannot read {WEIGHTS_FILE} "
                                f"({str(exc).splitlines()[0] if str(exc) else type(exc).__name__}); "
                                "rebuild it") from None
    try:
        models = [RoutedModel(**m) for m in config["models"]]
        featurizer = restore_featurizer(config["features"], tensors, device=device)
        settings = dict(config["router"])
        kind, n_models = settings.pop("type"), settings.pop("n_models")
        params = {k.removeprefix("router."): v for k, v in tensors.items() if k.startswith("router.")}
        fitted = FittedRouter(kind, n_models, settings, params)
        info = {k: v for k, v in config.items() if k in ("labels", "training", "calibration")}
        return Router(models, featurizer, fitted, list(config["order"]), int(config["n_cheap"]),
                      float(config["threshold"]), tensors.get("calibration.tail", torch.zeros(0)), info)
    except (KeyError, TypeError, ValueError) as exc:
        raise RouterFolderError(f"{not_router}: {CONFIG_FILE} is incomplete ({exc!r}); rebuild it") from None
