"""Model references: what a recipe's ``model:`` string points at, resolved to local files.

A reference is a local folder of safetensors (one file or shards with an index), a single
``.safetensors`` file, or a Hub id ``org/name`` / ``org/name@revision`` found through
huggingface_hub's cache (downloaded when online; ``HF_HUB_OFFLINE=1`` uses the cache alone).
Pickle checkpoints (``.bin``, ``.pt``) are refused unless explicitly allowed.

A PEFT LoRA adapter folder (``adapter_config.json`` + ``adapter_model.safetensors``, local or on
the Hub) is a reference too: ``base+adapter`` (mergekit's form) means the base with the adapter
applied, and a bare adapter is applied to ``base`` when the caller gives one (a recipe's
``base_model``), else to the model its config names (``base_model_name_or_path``). The result is
the base's :class:`ResolvedModel` with :attr:`ResolvedModel.adapter` set.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from fusekit.errors import CheckpointError, CheckpointNotFoundError
from fusekit.lora.config import ADAPTER_CONFIG, ADAPTER_PICKLE, ADAPTER_WEIGHTS, LoraConfig, read_lora_config
from fusekit.progress import hub_bars

SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
MAX_INDEX_BYTES = 64 * 2**20  # real indexes are a few hundred KiB
# Everything a merge needs from a Hub repo: weights, configs, tokenizer files.
HUB_PATTERNS = ["*.safetensors", "*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja"]


@dataclass(frozen=True)
class ResolvedAdapter:
    """A LoRA adapter reference resolved to its folder, weights and parsed config.

    Attributes:
        ref: the adapter's reference as written (without the ``base+`` part).
        folder: the adapter folder.
        weights: its ``adapter_model.safetensors``.
        config: the parsed ``adapter_config.json``.
        hub_id / revision: set for Hub references; revision is the resolved commit.
    """

    ref: str
    folder: Path
    weights: Path
    config: LoraConfig
    hub_id: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class ResolvedModel:
    """A model reference resolved to files on disk.

    Attributes:
        ref: the reference as the recipe wrote it.
        folder: the folder holding config.json and tokenizer files (may lack them).
        weight_files: safetensors (or, when allowed, pickle) files holding the tensors.
        index: tensor name → file, from an index json, when the checkpoint has one.
        hub_id / revision: set for Hub references; revision is the resolved commit.
        adapter: the LoRA adapter applied on top of these weights, or None; ``folder``,
            ``weight_files``, ``hub_id`` and ``revision`` then describe the base.
        base_ref: the base's reference when ``adapter`` is set.
    """

    ref: str
    folder: Path
    weight_files: tuple[Path, ...]
    index: dict[str, Path] | None = None
    hub_id: str | None = None
    revision: str | None = None
    adapter: ResolvedAdapter | None = None
    base_ref: str | None = None

    @property
    def is_pickle(self) -> bool:
        return any(f.suffix in PICKLE_SUFFIXES for f in self.weight_files)

    @property
    def config_path(self) -> Path:
        return self.folder / "config.json"


def split_revision(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` → ``("org/name", "rev")``; no ``@`` → revision None."""
    name, sep, revision = ref.rpartition("@")
    if sep and name and revision and "/" not in revision:
        return name, revision
    return ref, None


def _local_exists(ref: str) -> bool:
    """Whether ``ref`` names something on disk; an unusable path (too long, no permission) is a
    one-line error rather than the OSError ``Path.exists`` raises for it."""
    try:
        return Path(ref).expanduser().exists()
    except OSError as exc:
        raise CheckpointNotFoundError(f"model '{ref[:80]}{'...' if len(ref) > 80 else ''}': the path "
                                      f"cannot be used ({exc.strerror or exc}); check it") from None


def hub_repo_id(ref: str) -> str | None:
    """The Hub repository id ``ref`` names, or None when it is (or looks like) a local path."""
    repo_id, _ = split_revision(ref)
    if ref.startswith((".", "/", "~")) or _local_exists(ref) or not _HUB_ID.match(repo_id):
        return None
    return repo_id


def resolve_model(ref: str, *, allow_pickle: bool = False, base: str | None = None) -> ResolvedModel:
    """Find the files behind ``ref``; raise a one-line error naming it when there are none.

    Args:
        ref: a local path, a Hub id (``org/name[@revision]``), an adapter, or ``base+adapter``.
        allow_pickle: accept ``.bin`` / ``.pt`` checkpoints.
        base: the model a bare adapter is applied to (a recipe's ``base_model``); default: the
            adapter's ``base_model_name_or_path``.

    Raises:
        CheckpointNotFoundError / CheckpointError: one line naming ``ref`` and what to do.
    """
    pair = split_adapter_ref(ref)
    if pair is not None:
        base_ref, adapter_ref = pair
        adapter = resolve_adapter(adapter_ref)
        return _with_adapter(ref, base_ref, adapter, allow_pickle=allow_pickle)
    folder, repo_id, commit = _locate(ref)
    if folder.is_dir() and (folder / ADAPTER_CONFIG).is_file():
        adapter = _read_adapter(ref, folder, repo_id, commit)
        named_base = base or adapter.config.base_model
        if not named_base:
            raise CheckpointError(f"adapter '{ref}': its adapter_config.json names no base model "
                                  "(base_model_name_or_path); write it as BASE+ADAPTER or set base_model")
        return _with_adapter(ref, named_base, adapter, allow_pickle=allow_pickle)
    # Cache snapshots hold symlinks into the repo's blobs/ folder, two levels up.
    link_root = folder.parent.parent if repo_id else None
    resolved = _resolve_local(ref, folder, allow_pickle=allow_pickle, link_root=link_root)
    if repo_id is None:
        return resolved
    return ResolvedModel(ref, resolved.folder, resolved.weight_files, resolved.index,
                         hub_id=repo_id, revision=commit)


def split_adapter_ref(ref: str) -> tuple[str, str] | None:
    """mergekit's ``"base+adapter"`` → ``("base", "adapter")``; None when ``ref`` is not of that
    form (no ``+``, an empty side, or a local path whose name contains ``+``)."""
    base, sep, adapter = ref.partition("+")
    if not sep or not base.strip() or not adapter.strip() or _local_exists(ref):
        return None
    return base, adapter


def resolve_adapter(ref: str) -> ResolvedAdapter:
    """Resolve ``ref`` (a local folder or a Hub id) that must be a PEFT LoRA adapter.

    Raises:
        CheckpointNotFoundError / CheckpointError: one line naming ``ref``: missing, not an
            adapter folder, no weights, or an adapter type fusekit does not apply.
    """
    folder, repo_id, commit = _locate(ref)
    if not (folder.is_dir() and (folder / ADAPTER_CONFIG).is_file()):
        raise CheckpointError(f"adapter '{ref}': {folder} has no {ADAPTER_CONFIG}, so it is not a PEFT "
                              "adapter; BASE+ADAPTER needs an adapter folder after the '+'")
    return _read_adapter(ref, folder, repo_id, commit)


def _locate(ref: str) -> tuple[Path, str | None, str | None]:
    """The local file or folder behind ``ref``, and its Hub id and commit when it came from the Hub."""
    if _local_exists(ref):
        return Path(ref).expanduser(), None, None
    repo_id = hub_repo_id(ref)
    if repo_id is not None:
        _, revision = split_revision(ref)
        folder, commit = _download(repo_id, revision)
        return folder, repo_id, commit
    raise CheckpointNotFoundError(
        f"model '{ref}': no such folder or file; check the path (relative paths are taken from "
        f"the current folder, {Path.cwd()})")


def _read_adapter(ref: str, folder: Path, repo_id: str | None, commit: str | None) -> ResolvedAdapter:
    config = read_lora_config(folder, ref=ref)
    weights = folder / ADAPTER_WEIGHTS
    if not weights.is_file():
        why = (f"holds {ADAPTER_PICKLE} (a pickle); convert it to {ADAPTER_WEIGHTS}"
               if (folder / ADAPTER_PICKLE).is_file() else f"has no {ADAPTER_WEIGHTS}; download it again")
        raise CheckpointNotFoundError(f"adapter '{ref}': {folder} {why}")
    return ResolvedAdapter(ref, folder, weights, config, hub_id=repo_id, revision=commit)


def _with_adapter(ref: str, base_ref: str, adapter: ResolvedAdapter, *, allow_pickle: bool) -> ResolvedModel:
    base = resolve_model(base_ref, allow_pickle=allow_pickle)
    if base.adapter is not None:
        raise CheckpointError(f"model '{ref}': the base '{base_ref}' is itself an adapter; apply "
                              "adapters to a full model (merge the inner adapter into its base first)")
    return ResolvedModel(ref, base.folder, base.weight_files, base.index, base.hub_id, base.revision,
                         adapter=adapter, base_ref=base_ref)


def require_config(model: ResolvedModel, why: str) -> Path:
    """``model``'s config.json, which must be a regular file; ``why`` says what needs it.

    Raises:
        CheckpointNotFoundError: one line naming the missing (or not regular) file and ``why``.

    Example:
        >>> require_config(resolve_model("./base"), "it is run")  # doctest: +SKIP
        PosixPath('base/config.json')
    """
    path = model.config_path
    if not path.is_file():
        state = "is not a regular file" if path.exists() else "is missing"
        raise CheckpointNotFoundError(f"model '{model.ref}': {path} {state}, and {why}; copy the "
                                      "config.json that was saved with these weights into its folder")
    return path


def _resolve_local(ref: str, path: Path, *, allow_pickle: bool,
                   link_root: Path | None = None) -> ResolvedModel:
    if not (path.is_file() or path.is_dir()):
        raise CheckpointError(f"model '{ref}': {path} is not a regular file or a folder (a device, "
                              "pipe or socket); point it at a .safetensors file or a model folder")
    if path.is_file():
        if path.suffix == ".safetensors":
            return ResolvedModel(ref, path.parent, (path,))
        if path.suffix in PICKLE_SUFFIXES:
            _refuse_pickle(ref, allow_pickle)
            return ResolvedModel(ref, path.parent, (path,))
        raise CheckpointError(f"model '{ref}': {path.name} is not a .safetensors file or a folder")
    for index_name in (SAFETENSORS_INDEX, PICKLE_INDEX):
        if (path / index_name).is_file():
            if index_name == PICKLE_INDEX:
                _refuse_pickle(ref, allow_pickle)
            index = read_index(ref, path, path / index_name, link_root=link_root)
            files = tuple(dict.fromkeys(index.values()))
            return ResolvedModel(ref, path, files, index)
    safetensors = sorted(path.glob("*.safetensors"))
    if safetensors:
        return ResolvedModel(ref, path, tuple(safetensors))
    pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())
    if pickles:
        _refuse_pickle(ref, allow_pickle)
        return ResolvedModel(ref, path, tuple(pickles))
    raise CheckpointNotFoundError(f"model '{ref}': folder {path} holds no .safetensors weights")


def _refuse_pickle(ref: str, allow_pickle: bool) -> None:
    if not allow_pickle:
        raise CheckpointError(
            f"model '{ref}': pickle checkpoints (.bin/.pt) can run code when loaded and are refused; "
            "convert it to safetensors, or pass --allow-pickle if you trust its source")


def read_index(ref: str, folder: Path, index_path: Path, *,
               link_root: Path | None = None) -> dict[str, Path]:
    """Tensor name → shard file from an index json.

    Shard names must be plain names inside ``folder``; a shard that is a symlink must point inside
    ``link_root`` (default: ``folder`` itself), so an index cannot make fusekit read other files.
    """
    try:
        if index_path.stat().st_size > MAX_INDEX_BYTES:
            raise CheckpointError(f"model '{ref}': {index_path} is larger than "
                                  f"{MAX_INDEX_BYTES // 2**20} MiB; it is not a checkpoint index")
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except OSError as exc:
        raise CheckpointError(f"model '{ref}': cannot read {index_path} ({exc.strerror or exc})") from None
    except (ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointError(f"model '{ref}': {index_path} is not a valid index "
                              "(expected JSON with a 'weight_map' object)") from None
    files: dict[str, Path] = {}
    shard_paths: dict[str, Path] = {}
    for tensor, shard in weight_map.items():
        if shard not in shard_paths:
            shard_paths[shard] = _shard_path(ref, folder, index_path, shard, link_root or folder)
        files[tensor] = shard_paths[shard]
    return files


def _shard_path(ref: str, folder: Path, index_path: Path, shard: object, link_root: Path) -> Path:
    outside = CheckpointError(f"model '{ref}': {index_path.name} points outside its folder "
                              f"({shard!r}); refusing to read it")
    if not isinstance(shard, str) or not shard or Path(shard).is_absolute():
        raise CheckpointError(f"model '{ref}': {index_path.name} names shard {shard!r}, which is "
                              "not a file name inside the model folder")
    path = folder / shard
    if os.path.normpath(shard).startswith(".."):
        raise outside
    if not path.resolve().is_relative_to(link_root.resolve()):
        raise outside
    if not path.is_file():
        raise CheckpointNotFoundError(f"model '{ref}': shard {shard} listed in {index_path.name} "
                                      "is missing; download the model again")
    return path


def _download(repo_id: str, revision: str | None) -> tuple[Path, str | None]:
    """Fetch (or find in the cache) a Hub snapshot; return its folder and commit."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        with hub_bars():
            folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS))
    except LocalEntryNotFoundError:
        raise CheckpointNotFoundError(
            f"model '{where}' is not in the Hugging Face cache and the Hub cannot be reached "
            f"(offline); download it once online (hf download {repo_id}"
            f"{f' --revision {revision}' if revision else ''}) or use a local path"
        ) from None
    except GatedRepoError:
        raise CheckpointNotFoundError(f"model '{where}' is gated; accept its terms on the Hub and "
                                      "log in (HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(f"model '{where}': revision '{revision}' does not exist") from None
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(f"model '{where}': no such repository on the Hub (or it is "
                                      "private and no token is set)") from None
    return folder, folder.name
