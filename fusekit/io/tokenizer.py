"""Tokenizer files and chat templates for a merged model (copied, never rebuilt)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from fusekit.chat_templates import load_template, template_names, template_problem
from fusekit.errors import CheckpointError, RecipeError
from fusekit.io import files
from fusekit.io.files import write_error, write_json, write_text
from fusekit.io.refs import ResolvedModel

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"
MAX_JSON_BYTES = 256 * 2**20  # the largest real tokenizer.json files are tens of MiB


def check_tokenizer_files(folder: Path) -> None:
    """Refuse tokenizer files that cannot be what they claim, before anything is copied or merged.

    Each of :data:`TOKENIZER_FILES` that ``folder`` holds must be a regular file (not a device, pipe
    or folder behind its name), and each ``.json`` one a JSON object, as transformers expects.

    Raises:
        CheckpointError: one line naming the file and what is wrong with it.
    """
    for name in TOKENIZER_FILES:
        path = folder / name
        if not path.exists():
            continue
        if not path.is_file():
            raise CheckpointError(f"{path}: is not a regular file; replace it with the model's own "
                                  f"{name}, or remove it")
        if path.suffix == ".json":
            read_json_object(path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in ``path``.

    Raises:
        CheckpointError: one line naming ``path`` when it is unreadable, not JSON or not an object.
    """
    return files.read_json_object(path, max_bytes=MAX_JSON_BYTES, kind="a tokenizer file",
                                  fix=f"restore the model's own {path.name}")


def copy_tokenizer(source: ResolvedModel, out: Path) -> list[str]:
    """Copy the tokenizer files that ``source`` has into ``out``; return their names.

    Raises:
        CheckpointError: a tokenizer file is broken (see :func:`check_tokenizer_files`).
    """
    check_tokenizer_files(source.folder)
    copied = []
    for name in TOKENIZER_FILES:
        path = source.folder / name
        if path.is_file():
            try:
                shutil.copyfile(path, out / name)
            except OSError as exc:
                raise write_error(out / name, exc) from None
            copied.append(name)
    return copied


def copy_generation_config(donor: ResolvedModel, out: Path) -> bool:
    path = donor.folder / GENERATION_CONFIG
    if not path.is_file():
        return False
    try:
        shutil.copyfile(path, out / GENERATION_CONFIG)
    except OSError as exc:
        raise write_error(out / GENERATION_CONFIG, exc) from None
    return True


def resolve_chat_template(value: str | None, source: ResolvedModel | None) -> str | None:
    """The template text ``chat_template`` asks for; None keeps the tokenizer's own.

    ``auto`` keeps the tokenizer source's template; a built-in name (one of
    :func:`fusekit.chat_templates.template_names`: ``alpaca``, ``chatml``, ``exaone``, ``llama3``,
    ``mistral``, ``zephyr``) or a literal Jinja template (anything containing ``{``) replaces it.

    Raises:
        RecipeError: ``value`` is none of these; the line lists the built-in names.
    """
    if value is None or value == "auto":
        return None
    if value in template_names():
        return load_template(value)
    problem = template_problem(value)
    if problem is not None:
        raise RecipeError(f"chat_template: {problem}")
    return value


def write_chat_template(out: Path, template: str) -> None:
    """Store ``template`` as chat_template.jinja and drop any older copy in tokenizer_config."""
    write_text(out / TEMPLATE_FILE, template)
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        config = read_json_object(config_path)
        if config.pop("chat_template", None) is not None:
            write_json(config_path, config)
