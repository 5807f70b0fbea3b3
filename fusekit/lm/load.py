"""Load a causal language model and its tokenizer from any model reference fusekit accepts.

The reference goes through :func:`fusekit.io.refs.resolve_model` (local folder, single file's folder,
Hub id via the cache), so ``ensemble``, ``route`` and ``moe`` accept exactly what ``merge`` does.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fusekit.device import resolve_device
from fusekit.errors import CheckpointError, FusekitError
from fusekit.io.reader import CheckpointReader
from fusekit.io.refs import ResolvedModel, require_config, resolve_model
from fusekit.io.tokenizer import check_tokenizer_files

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

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
        raise FusekitError("running a model needs transformers; install fusekit with the 'lm' extra: "
                           "pip install 'fusekit[lm]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def load_lm(ref: str | Path, *, device: str = "cpu", dtype: str | None = "float32",
            tokenizer: bool = True, allow_pickle: bool = False) -> LoadedLM:
    """Load ``ref`` as a causal LM (and its tokenizer) for inference.

    Args:
        ref: a model reference, as in a recipe's ``model:``.
        device: ``cpu``, ``cuda`` or ``auto``.
        dtype: ``float32`` (default, exact on CPU), ``bfloat16``, ``float16``, or None for the
            checkpoint's own dtype.
        tokenizer: also load the tokenizer; a model folder without one is then an error.
        allow_pickle: accept ``.bin`` checkpoints (weights-only load).

    Raises:
        FusekitError: one line naming ``ref`` when it cannot be found or loaded.
    """
    resolved = resolve_model(str(ref), allow_pickle=allow_pickle)
    check_weights(resolved)
    transformers = import_transformers()
    target = resolve_device(device)
    torch_dtype = _DTYPES[dtype] if dtype else "auto"
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            resolved.folder, dtype=torch_dtype, use_safetensors=not resolved.is_pickle,
            local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"model '{ref}': transformers cannot load {resolved.folder}: "
                              f"{str(exc).splitlines()[0]}") from None
    model.to(target).eval()
    tok = load_tokenizer(ref, resolved.folder) if tokenizer else None
    logging.getLogger(__name__).debug("loaded %s on %s", ref, target)
    return LoadedLM(str(ref), resolved, model, tok, target)


def check_weights(resolved: ResolvedModel) -> None:
    """The checks a merge input passes, run before transformers opens ``resolved``'s files.

    config.json must be a regular file, and every safetensors file must pass the merge reader's
    header, size and offset checks, with no tensor in two files and as many blocks as config.json
    counts (see :class:`fusekit.io.reader.CheckpointReader`); no tensor data is read. Pickle
    checkpoints (allowed explicitly) are left to their weights-only loader.

    Raises:
        CheckpointError: one line naming the file at fault.
        CheckpointNotFoundError: config.json is missing.

    Example:
        >>> check_weights(resolve_model("./merged"))  # doctest: +SKIP
    """
    require_config(resolved, "a model cannot be run without it")
    if resolved.is_pickle:
        return
    with CheckpointReader(resolved) as reader:
        reader.infos  # noqa: B018  # parses and checks every header


def load_tokenizer(ref: str | Path, folder: Path) -> PreTrainedTokenizerBase:
    """The tokenizer saved in ``folder``; a clear error when there is none."""
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                      "tokenizer.model", "vocab.json")):
        raise CheckpointError(f"model '{ref}': {folder} has no tokenizer files; copy the tokenizer "
                              "of the model it was trained from into that folder")
    check_tokenizer_files(folder)
    transformers = import_transformers()
    try:
        return transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise CheckpointError(f"model '{ref}': cannot load the tokenizer in {folder}: "
                              f"{str(exc).splitlines()[0]}") from None
