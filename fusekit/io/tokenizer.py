"""Tokenizer files and chat templates for a merged model (copied, never rebuilt)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from fusekit.errors import RecipeError
from fusekit.io.refs import ResolvedModel
from fusekit.io.writer import write_error, write_json, write_text

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)
GENERATION_CONFIG = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"

# ChatML, the most widely used role-tagged format; written here from its published description.
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


def copy_tokenizer(source: ResolvedModel, out: Path) -> list[str]:
    """Copy the tokenizer files that ``source`` has into ``out``; return their names."""
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

    ``auto`` keeps the tokenizer source's template; a built-in name (``chatml``) or a literal
    Jinja template (anything containing ``{``) replaces it.
    """
    if value is None or value == "auto":
        return None
    if value in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[value]
    if "{" in value:
        return value
    names = ", ".join(["auto", *BUILTIN_TEMPLATES])
    raise RecipeError(f"chat_template: '{value}' is neither a known template ({names}) nor a "
                      "Jinja template; give one of those names or the template text")


def write_chat_template(out: Path, template: str) -> None:
    """Store ``template`` as chat_template.jinja and drop any older copy in tokenizer_config."""
    write_text(out / TEMPLATE_FILE, template)
    config_path = out / "tokenizer_config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.pop("chat_template", None) is not None:
            write_json(config_path, config)
