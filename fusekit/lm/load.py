"""Load a causal language model and its tokenizer from any model reference fusekit accepts.

The reference goes through :func:`fusekit.io.refs.resolve_model` (local folder, single file's folder,
Hub id via the cache, PEFT LoRA adapter, ``base+adapter``), so ``score``, ``ensemble``, ``route`` and
``moe`` accept exactly what ``merge`` does. An adapter is applied with PEFT on the base transformers
loaded, then merged into it.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fusekit.device import resolve_device
from fusekit.errors import CheckpointError, FusekitError
from fusekit.io.reader import open_reader, read_safetensors_header
from fusekit.io.refs import ResolvedModel, require_config, resolve_model
from fusekit.io.tokenizer import check_tokenizer_files

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class LoadedLM:
    """A model ready to run.

    Attributes:
        ref: the reference as the user wrote it.
        resolved: where its files are.
        model: a ``PreTrainedModel`` in eval mode on ``device``.
        tokenizer: its tokenizer, or None when loaded with ``tokenizer=False``.
        device: where the model's weights live.
    """

    ref: str
    resolved: ResolvedModel
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase | None
    device: torch.device

    @property
    def folder(self) -> Path:
        return self.resolved.folder


def import_transformers() -> Any:
    """transformers, quiet (no progress bars); a one-line error when the lm extra is missing."""
    try:
        import transformers
    except ImportError:
        from fusekit.extras import install_hint

        raise FusekitError(f"running a model needs transformers; {install_hint('lm')}") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def import_peft() -> Any:
    """peft; a one-line error naming the ``lora`` extra when it is missing."""
    try:
        import peft
    except ImportError:
        from fusekit.extras import install_hint

        raise FusekitError(f"LoRA adapters need peft; {install_hint('lora')}") from None
    return peft


def load_lm(ref: str | Path, *, device: str = "cpu", dtype: str | None = "float32",
            tokenizer: bool = True, allow_pickle: bool = False) -> LoadedLM:
    """Load ``ref`` as a causal LM (and its tokenizer) for inference.

    Args:
        ref: a model reference, as in a recipe's ``model:``; a LoRA adapter (``base+adapter``, or an
            adapter folder whose config names its base) is applied to its base and merged into it.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: ``float32`` (default, exact on CPU), ``bfloat16``, ``float16``, or None for the
            checkpoint's own dtype.
        tokenizer: also load the tokenizer; a model folder without one is then an error.
        allow_pickle: accept ``.bin`` checkpoints (weights-only load).

    Raises:
        FusekitError: one line naming ``ref`` when it cannot be found or loaded, or when it is an
            adapter and peft is missing or the adapter does not fit its base.
    """
    resolved = resolve_model(str(ref), allow_pickle=allow_pickle)
    check_weights(resolved)
    target = resolve_device(device)
    model = load_base_model(ref, resolved, dtype=dtype)
    if resolved.adapter is not None:
        model = apply_adapter(model, resolved)
    model.to(target).eval()
    tok = load_tokenizer(ref, tokenizer_folder(resolved)) if tokenizer else None
    logging.getLogger(__name__).debug("loaded %s on %s", ref, target)
    return LoadedLM(str(ref), resolved, model, tok, target)


def load_base_model(ref: str | Path, resolved: ResolvedModel, *, dtype: str | None = "float32") -> Any:
    """The model in ``resolved.folder`` (an adapter's base: no adapter applied), on the CPU, with
    transformers; ``dtype`` as :func:`load_lm` takes it.

    Raises:
        CheckpointError: one line naming ``ref`` when transformers cannot load the folder.
    """
    transformers = import_transformers()
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(
            resolved.folder, dtype=_DTYPES[dtype] if dtype else "auto",
            use_safetensors=not resolved.is_pickle, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"model '{ref}': transformers cannot load {resolved.folder}: "
                              f"{str(exc).splitlines()[0]}") from None


def check_weights(resolved: ResolvedModel) -> None:
    """The checks a merge input passes, run before transformers opens ``resolved``'s files.

    config.json must be a regular file, and every safetensors file must pass the merge reader's
    header, size and offset checks, with no tensor in two files and as many blocks as config.json
    counts (see :class:`fusekit.io.reader.CheckpointReader`); an adapter's safetensors file passes the
    same header checks; no tensor data is read. Pickle checkpoints (allowed explicitly) are left to
    their weights-only loader.

    Raises:
        CheckpointError: one line naming the file at fault.
        CheckpointNotFoundError: config.json is missing.

    Example:
        >>> check_weights(resolve_model("./merged"))  # doctest: +SKIP
    """
    require_config(resolved, "a model cannot be run without it")
    if resolved.adapter is not None:
        read_safetensors_header(resolved.adapter.weights)
    if resolved.is_pickle:
        return
    with open_reader(resolved) as reader:
        reader.infos  # noqa: B018  # parses and checks every header


def apply_adapter(model: Any, resolved: ResolvedModel) -> Any:
    """``model`` (the base, loaded from ``resolved.folder``) with ``resolved.adapter`` applied by PEFT
    and merged into its weights.

    The adapter is merged (``merge_and_unload``) so inference runs at the base's speed, with no
    adapter layers in the forward pass; :func:`fusekit.lm.library.load_members` keeps adapters
    unmerged beside one shared base instead.

    Raises:
        FusekitError: peft is missing, or the adapter does not fit the base (one line naming both).
    """
    return attach_adapter(model, resolved).merge_and_unload()


def attach_adapter(model: Any, resolved: ResolvedModel, *, name: str = "default") -> Any:
    """``resolved.adapter`` loaded by PEFT, unmerged, as adapter ``name`` of ``model``: a new
    ``PeftModel`` over the base ``model``, or ``model`` itself when it already is one.

    Raises:
        FusekitError: peft is missing, or the adapter does not fit the base (one line naming both).
    """
    adapter = resolved.adapter
    assert adapter is not None
    peft = import_peft()
    where = f"adapter '{adapter.ref}' on base '{resolved.base_ref or resolved.folder}'"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if isinstance(model, peft.PeftModel):
                result = model.load_adapter(str(adapter.folder), name, is_trainable=False)
                missing = [f"missing adapter keys: {result.missing_keys}"] if result.missing_keys else []
            else:
                model = peft.PeftModel.from_pretrained(model, str(adapter.folder), adapter_name=name,
                                                       is_trainable=False)
                missing = []
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            raise CheckpointError(f"{where}: PEFT cannot apply it: {_first_line(exc)}; check that the "
                                  "adapter was trained on this base") from None
    missing += [str(w.message) for w in caught if "missing adapter keys" in str(w.message)]
    if missing:
        raise CheckpointError(f"{where}: the adapter's tensors do not match the base's modules "
                              f"({_first_line(missing[0])[:200]}); check that it was trained on this base")
    return model


def _first_line(exc: BaseException | str) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def tokenizer_folder(resolved: ResolvedModel) -> Path:
    """Where ``resolved``'s tokenizer lives: an adapter's folder when it holds tokenizer files, else
    the model's (the base's) folder."""
    if resolved.adapter is not None and _has_tokenizer(resolved.adapter.folder):
        return resolved.adapter.folder
    return resolved.folder


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / name).is_file() for name in _TOKENIZER_FILES)


def load_tokenizer(ref: str | Path, folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``folder``; a clear error when there is none."""
    if not _has_tokenizer(folder):
        raise CheckpointError(f"model '{ref}': {folder} has no tokenizer files; copy the tokenizer "
                              "of the model it was trained from into that folder")
    check_tokenizer_files(folder)
    transformers = import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"model '{ref}': cannot load the tokenizer in {folder}: "
                              f"{str(exc).splitlines()[0]}") from None
