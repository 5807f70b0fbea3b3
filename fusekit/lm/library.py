"""Load many models at once, holding a base that several LoRA adapters share only once.

:func:`load_members` is :func:`fusekit.lm.load.load_lm` for a list of references. References that are
LoRA adapters over the same base (and the base itself, when it is one of the references) share one
copy of that base: a PEFT multi-adapter model, the adapters kept unmerged beside it. Each member's
``LoadedLM.model`` is an :class:`AdapterView`: it runs like that member's own model (same forward,
same ``.config``, ``.device``, ``.get_input_embeddings()``) and switches the shared model to its
adapter (or turns adapters off, for the base) for the length of each call. Memory for N adapters is
then about one base plus N adapters, instead of N bases.

An adapter is exact to float32 rounding against the same adapter merged by ``load_lm``: PEFT adds
``scaling · B (A x)`` to ``W x`` instead of computing ``(W + scaling · B A) x``.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

from fusekit.device import resolve_device
from fusekit.errors import FusekitError
from fusekit.io.refs import ResolvedModel, resolve_model
from fusekit.lm.load import (
    LoadedLM,
    attach_adapter,
    check_weights,
    load_base_model,
    load_lm,
    load_tokenizer,
    tokenizer_folder,
)

__all__ = ["AdapterView", "SharedBase", "load_members", "share_groups"]

BaseKey = tuple[str, tuple[str, ...]]
"""What makes two references the same base: its folder and weight files, as absolute paths."""

_OFF = object()  # SharedBase.active before the first call: no state assumed


class SharedBase:
    """One loaded base with several PEFT adapters, and which one is switched on.

    Switching goes through PEFT's ``set_adapter`` / ``disable_adapter_layers`` once per adapter, when
    the base is built; what that leaves in each adapter layer (its active adapter and whether adapters
    are off) is recorded, and later switches write the record back, which costs microseconds where
    ``set_adapter`` walks every module (as long as a forward pass of a small model).

    Args:
        peft_model: a ``peft.PeftModel`` holding every adapter, in eval mode on its device.

    Attributes:
        model: the transformers model inside (its LoRA layers hold every adapter).
        adapters: the PEFT adapter names it holds.
    """

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model
        self.model = peft_model.get_base_model()
        self.adapters = tuple(peft_model.peft_config)
        self._tuner = peft_model.base_model
        self._active: object = _OFF
        self._lock = threading.RLock()
        self._layers = [m for m in self.model.modules() if hasattr(m, "_active_adapter")
                        and hasattr(m, "_disable_adapters")]
        self._states = {name: self._record(name) for name in (*self.adapters, None)}
        peft_model.requires_grad_(False)

    def _switch(self, name: str | None) -> None:
        """PEFT's own switch: adapter ``name`` on, or every adapter off."""
        if name is None:
            self._tuner.disable_adapter_layers()
        else:
            self._tuner.enable_adapter_layers()
            self._tuner.set_adapter(name, inference_mode=True)

    def _record(self, name: str | None) -> list[tuple[Any, bool]]:
        self._switch(name)
        return [(copy.copy(m._active_adapter), bool(m._disable_adapters)) for m in self._layers]

    @contextmanager
    def active(self, name: str | None) -> Iterator[Any]:
        """Switch adapter ``name`` on (None: every adapter off, the bare base) for the block, holding
        a lock so concurrent callers do not switch it under each other; yields :attr:`model`."""
        with self._lock:
            if name != self._active:
                for layer, (adapter, off) in zip(self._layers, self._states[name], strict=True):
                    layer._active_adapter, layer._disable_adapters = copy.copy(adapter), off
                self._active = name
            yield self.model

    def view(self, name: str | None) -> AdapterView:
        """A model-like object that runs this base with adapter ``name`` (None: the bare base)."""
        return _view_class(type(self.model))(self, name)


class AdapterView:
    """One member's model on a :class:`SharedBase`: calls run with its adapter switched on; every
    other attribute (``config``, ``device``, ``dtype``, ``get_input_embeddings`` ...) is the shared
    model's.

    Args:
        shared: the base and its adapters.
        adapter_name: the PEFT adapter this member is, or None for the base itself.
    """

    def __init__(self, shared: SharedBase, adapter_name: str | None) -> None:
        self._shared = shared
        self.adapter_name = adapter_name

    @property
    def shared(self) -> SharedBase:
        return self._shared

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self._shared.active(self.adapter_name) as model:
            return model(*args, **kwargs)

    @property
    def forward(self) -> Callable[..., Any]:
        """The shared model's forward, with this member's adapter on (its signature is the model's)."""

        @functools.wraps(self._shared.model.forward)
        def forward(*args: Any, **kwargs: Any) -> Any:
            return self(*args, **kwargs)

        return forward

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_shared"):  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._shared.model, name)

    def __repr__(self) -> str:
        return f"AdapterView({type(self._shared.model).__name__}, adapter={self.adapter_name!r})"


_VIEW_CLASSES: dict[type, type[AdapterView]] = {}


def _view_class(model_type: type) -> type[AdapterView]:
    """An :class:`AdapterView` subclass per model class, so per-class lookups (such as
    :func:`fusekit.lm.decode.cache_keyword`) see one architecture per type."""
    if model_type not in _VIEW_CLASSES:
        _VIEW_CLASSES[model_type] = type(f"{model_type.__name__}View", (AdapterView,), {})
    return _VIEW_CLASSES[model_type]


def _base_key(resolved: ResolvedModel) -> BaseKey:
    return str(resolved.folder.resolve()), tuple(str(f.resolve()) for f in resolved.weight_files)


def _base_name(resolved: ResolvedModel) -> str:
    return resolved.base_ref or str(resolved.folder)


def share_groups(resolved: Sequence[ResolvedModel], *, share: bool | None = None) -> list[list[int]]:
    """Which references load on one shared base: lists of indices into ``resolved``.

    Adapters are grouped by the base they apply to; a reference that is that base itself joins the
    group. With ``share=None`` (auto) a group is kept when two or more references use it (one adapter
    alone loads faster merged); ``share=True`` keeps every adapter's group and refuses adapters over
    different bases; ``share=False`` shares nothing. An adapter that changes the base's biases
    (``bias: all`` or ``lora_only``) cannot share a base and loads merged on its own.

    Raises:
        FusekitError: ``share=True`` and the adapters name different bases, or one changes biases.
    """
    groups: dict[BaseKey, list[int]] = {}
    for i, r in enumerate(resolved):
        if r.adapter is None:
            continue
        if r.adapter.config.bias != "none":
            if share:
                raise FusekitError(f"shared_base: true: adapter '{r.adapter.ref}' changes its base's "
                                   f"biases (bias: {r.adapter.config.bias}), which a shared base cannot "
                                   "hold; set shared_base: false")
            continue
        groups.setdefault(_base_key(r), []).append(i)
    if share and len(groups) > 1:
        (first, *_), (second, *_) = list(groups.values())[:2]
        raise FusekitError(
            f"shared_base: true: adapters '{resolved[first].ref}' and '{resolved[second].ref}' are over "
            f"different bases '{_base_name(resolved[first])}' and '{_base_name(resolved[second])}'; use "
            "adapters of one base, or leave shared_base out to share each base among its own adapters")
    for i, r in enumerate(resolved):
        if r.adapter is None and _base_key(r) in groups:
            groups[_base_key(r)].append(i)
    if share is False:
        return []
    return [sorted(g) for g in groups.values() if share or len(g) >= 2]


def load_members(refs: Sequence[str | Path], *, device: str = "cpu", dtype: str | None = "float32",
                 tokenizer: bool = True, allow_pickle: bool = False,
                 share: bool | None = None) -> list[LoadedLM]:
    """One :class:`LoadedLM` per reference, in order; adapters over one base share one copy of it.

    Args:
        refs: model references, as :func:`~fusekit.lm.load.load_lm` takes them (duplicates allowed).
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: as for ``load_lm``.
        tokenizer: also load each member's tokenizer.
        allow_pickle: accept ``.bin`` checkpoints.
        share: None (auto: share a base two or more references use), True (every adapter on one
            shared base; adapters over different bases are an error), or False (``load_lm`` each).

    Returns:
        The loaded members; a shared member's ``model`` is an :class:`AdapterView`.

    Raises:
        FusekitError: a reference cannot be loaded, an adapter does not fit its base, or ``share``
            is True and the adapters name different bases (one line naming both).

    Example:
        >>> lms = load_members(["base+lora/python", "base+lora/c", "base"])  # doctest: +SKIP
        >>> lms[0].model.shared is lms[1].model.shared  # doctest: +SKIP
        True
    """
    resolved = [resolve_model(str(ref), allow_pickle=allow_pickle) for ref in refs]
    for r in resolved:
        check_weights(r)
    loaded: dict[int, LoadedLM] = {}
    for group in share_groups(resolved, share=share):
        views = _load_shared([resolved[i] for i in group], device=device, dtype=dtype)
        for i, view in zip(group, views, strict=True):
            tok = load_tokenizer(refs[i], tokenizer_folder(resolved[i])) if tokenizer else None
            loaded[i] = LoadedLM(str(refs[i]), resolved[i], cast(Any, view), tok, view.device)
    return [loaded[i] if i in loaded else load_lm(ref, device=device, dtype=dtype, tokenizer=tokenizer,
                                                  allow_pickle=allow_pickle)
            for i, ref in enumerate(refs)]


def _load_shared(group: Sequence[ResolvedModel], *, device: str, dtype: str | None) -> list[AdapterView]:
    """Load the group's base once, every distinct adapter into it, and a view per reference."""
    model = load_base_model(group[0].ref, group[0], dtype=dtype)
    names: dict[str, str] = {}  # adapter folder → PEFT adapter name
    for r in group:
        if r.adapter is not None and str(r.adapter.folder.resolve()) not in names:
            name = f"member{len(names)}"
            model = attach_adapter(model, r, name=name)
            names[str(r.adapter.folder.resolve())] = name
    model.to(resolve_device(device)).eval()
    shared = SharedBase(model)
    return [shared.view(None if r.adapter is None else names[str(r.adapter.folder.resolve())])
            for r in group]
