"""What ``fusekit serve`` serves: the YAML config, or the references of a quick start.

A config lists the served names, each with exactly one of ``model`` (a model folder, merged output,
Hub id or ``base+adapter``), ``ensemble`` (an ensemble recipe) or ``router`` (a router folder), plus
optional per-model batching settings, the request ``limits`` and where to listen::

    models:
      - {name: merged, model: ./merged}
      - {name: ens, ensemble: configs/ensemble/prob_avg.yaml, max_batch: 8}
      - {name: code-router, router: ./router}
    limits: {max_queue: 64, max_tokens_limit: 512}
    host: 127.0.0.1
    port: 8000

It is read like every recipe: strict keys, every problem on its own line naming ``file:line:column``.
The quick start (:func:`quick_config`) builds the same object from references given on the command
line, telling a router folder, an ensemble recipe and a model apart. Nothing here imports torch.

Example:
    >>> cfg = parse_serve_config("models: [{name: m, model: org/tiny}]\\nport: 9000\\n", "s.yaml")
    >>> (cfg.models[0].kind, cfg.models[0].ref, cfg.port, cfg.limits.max_queue)
    ('model', 'org/tiny', 9000, 64)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fusekit.errors import FusekitError
from fusekit.recipe.load import Location, load_recipe, parse_recipe

__all__ = ["Limits", "ServeConfig", "ServedModel", "is_serve_config", "load_serve_config",
           "parse_serve_config", "quick_config", "ref_kind", "with_overrides"]

ServedKind = Literal["model", "ensemble", "router"]
ROUTER_FILE = "router.json"  # fusekit.route.router.CONFIG_FILE, named here to keep torch out


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Strict):
    """Per-request limits and the default batching settings (each model may override the batching)."""

    max_batch: int = Field(default=16, ge=1, le=4096)
    max_queue: int = Field(default=64, ge=1)
    batch_wait_ms: float = Field(default=5.0, ge=0, le=10_000, allow_inf_nan=False)
    max_prompt_tokens: int = Field(default=4096, ge=1)
    max_tokens_limit: int = Field(default=1024, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    grace_seconds: float = Field(default=30.0, ge=0, le=3600, allow_inf_nan=False)


class ServedModel(_Strict):
    """One served name and what answers under it."""

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/+@-]*$")
    model: str | None = Field(default=None, min_length=1)
    ensemble: str | None = Field(default=None, min_length=1)
    router: str | None = Field(default=None, min_length=1)
    max_batch: int | None = Field(default=None, ge=1, le=4096)
    max_queue: int | None = Field(default=None, ge=1)
    batch_wait_ms: float | None = Field(default=None, ge=0, le=10_000, allow_inf_nan=False)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"

    @model_validator(mode="after")
    def _one_source(self) -> ServedModel:
        given = [k for k in ("model", "ensemble", "router") if getattr(self, k) is not None]
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise ValueError(f"give exactly one of model, ensemble, router (got {got})")
        return self

    @property
    def kind(self) -> ServedKind:
        """``model``, ``ensemble`` or ``router``: which of the three keys is set."""
        return "model" if self.model is not None else "ensemble" if self.ensemble is not None else "router"

    @property
    def ref(self) -> str:
        """The model reference, recipe path or router folder."""
        ref = self.model or self.ensemble or self.router
        assert ref is not None
        return ref


class ServeConfig(_Strict):
    """Everything ``fusekit serve`` serves, and how."""

    models: list[ServedModel] = Field(min_length=1)
    limits: Limits = Limits()
    host: str = Field(default="127.0.0.1", min_length=1)
    port: int = Field(default=8000, ge=0, le=65535)
    device: Literal["cpu", "cuda", "auto"] = "cpu"


def _checks(config: ServeConfig) -> list[tuple[Location, str]]:
    seen: dict[str, int] = {}
    problems: list[tuple[Location, str]] = []
    for i, served in enumerate(config.models):
        if served.name in seen:
            problems.append((("models", i, "name"), f"{served.name!r} is already the name of "
                             f"models[{seen[served.name]}]; give each served model its own name"))
        seen.setdefault(served.name, i)
    return problems


def load_serve_config(path: Path | str) -> ServeConfig:
    """Read a serve config file; every problem in one :class:`~fusekit.errors.RecipeError` naming its line.

    Args:
        path: the YAML file.

    Returns:
        The config.
    """
    return load_recipe(path, ServeConfig, _checks)[0]


def parse_serve_config(text: str, name: str = "<config>") -> ServeConfig:
    """Like :func:`load_serve_config` for YAML text held in memory."""
    return parse_recipe(text, name, ServeConfig, _checks)[0]


def ref_kind(ref: str) -> ServedKind:
    """What a quick-start reference is: a router folder, an ensemble recipe, or a model.

    Raises:
        FusekitError: the file is a recipe of another kind (a merge or router recipe, a serve config).
    """
    path = Path(ref)
    if path.is_dir():
        return "router" if (path / ROUTER_FILE).is_file() else "model"
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from fusekit.recipe.kind import file_kind

        kind = file_kind(path)
        if kind is not None and kind.name == "ensemble":
            return "ensemble"
        if kind is not None and kind.name == "serve":
            raise FusekitError(f"{ref}: this is a serve config; give it alone: fusekit serve {ref}")
        what = kind.label if kind is not None else "a YAML file fusekit cannot tell the kind of"
        raise FusekitError(f"{ref}: {what}, not a model, ensemble recipe or router folder; serve what it "
                           "builds (its output folder) instead")
    return "model"


def quick_config(refs: Sequence[str], names: Sequence[str] = (), **settings: object) -> ServeConfig:
    """A config serving each reference under its own name, for ``fusekit serve REF... [--name N]``.

    Args:
        refs: model folders, Hub ids, ``base+adapter`` references, ensemble recipes or router folders.
        names: the served names, in the order of ``refs`` (default: the folder's or recipe's name,
            a Hub id as it is written).
        **settings: other config keys (``limits``, ``host``, ``port``, ``device``).

    Raises:
        FusekitError: more names than references, two references with one name, or a recipe of
            another kind.
    """
    if len(names) > len(refs):
        raise FusekitError(f"{len(names)} --name options for {len(refs)} models; give at most one name "
                           "per model")
    entries = []
    for i, ref in enumerate(refs):
        kind = ref_kind(ref)
        name = names[i] if i < len(names) else _default_name(ref, kind)
        entries.append({"name": name, kind: ref})
    try:
        config = ServeConfig.model_validate({"models": entries, **settings})
    except ValueError as exc:
        raise FusekitError(f"cannot serve these models: {_first_error(exc)}") from None
    problems = _checks(config)
    if problems:
        raise FusekitError(f"{problems[0][1]}; give --name for each model")
    return config


def _default_name(ref: str, kind: ServedKind) -> str:
    path = Path(ref)
    if kind == "ensemble":
        return path.stem
    hub_id = re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?", ref) is not None and not path.exists()
    if hub_id:
        return ref  # a Hub id, as written
    return Path(ref.split("+")[-1].rstrip("/")).name or ref


def _first_error(exc: ValueError, *, as_option: bool = False) -> str:
    """The first problem pydantic found, as ``models.0.name: ...`` or, for a command-line value,
    ``--max-queue: ...``."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return str(exc)
    first = errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if as_option:
        loc = "--" + str(first["loc"][-1]).replace("_", "-")
    return f"{loc}: {first['msg']}, got {first.get('input')!r}"


def is_serve_config(path: str) -> bool:
    """Whether ``path`` should be read as a serve config rather than served as an ensemble recipe.

    A YAML file is a serve config unless it is an ensemble recipe: one with ``method``, ``primary`` or
    ``generation``, or a bare ``models:`` list whose entries do not carry a served ``name``. A YAML file
    of any other kind is read as a config too, so that its loader names the command it is for.
    """
    file = Path(path)
    if not (file.is_file() and file.suffix in (".yaml", ".yml")):
        return False
    from fusekit.recipe.kind import file_kind

    kind = file_kind(file)
    if kind is None or kind.name != "ensemble":
        return True
    if kind.keys:
        return False
    import yaml

    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return True
    entries = data.get("models") if isinstance(data, dict) else None
    sources = {"model", "ensemble", "router"}
    return isinstance(entries, list) and bool(entries) and all(
        isinstance(e, dict) and "name" in e and bool(sources & set(e)) for e in entries)


def with_overrides(config: ServeConfig, *, limits: Mapping[str, object] | None = None,
                   **settings: object) -> ServeConfig:
    """``config`` with command-line values (those not None) put over the file's, checked again.

    Args:
        config: the config as read.
        limits: ``limits`` keys to replace.
        **settings: top-level keys to replace (``host``, ``port``, ``device``).

    Raises:
        FusekitError: a value out of range, naming the option.
    """
    data = config.model_dump()
    data.update({k: v for k, v in settings.items() if v is not None})
    data["limits"].update({k: v for k, v in (limits or {}).items() if v is not None})
    try:
        return ServeConfig.model_validate(data)
    except ValueError as exc:
        raise FusekitError(_first_error(exc, as_option=True)) from None
