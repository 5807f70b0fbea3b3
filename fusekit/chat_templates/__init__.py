"""Named chat templates a recipe can ask for with ``chat_template: NAME``.

Each template is a data file ``NAME.jinja`` beside this module (package data), written as the
tokenizer's ``chat_template``. The names are the five mergekit 0.1.5 ships (``alpaca``, ``chatml``,
``exaone``, ``llama3``, ``mistral``) plus ``zephyr``. Each renders its format as the format's
authors publish it; on the conversations where mergekit's files are right the output is the same
string (``chatml``, ``mistral``). Three of mergekit's files render stray whitespace, which fusekit's
do not: ``llama3`` (mergekit puts a newline after every ``<|eot_id|>``, Meta's template does not),
``exaone`` (mergekit's indentation is rendered as spaces and extra newlines) and ``alpaca`` (mergekit
starts with two newlines when there is no system message and writes no blank line before the
generation prompt's ``### Response:``).

Example:
    >>> "llama3" in template_names()
    True
    >>> load_template("chatml").startswith("{% for message in messages %}")
    True
"""

from __future__ import annotations

from functools import cache
from importlib import resources

__all__ = ["load_template", "template_names", "template_problem"]

_SUFFIX = ".jinja"


@cache
def template_names() -> tuple[str, ...]:
    """The names of the built-in chat templates, sorted."""
    folder = resources.files(__name__)
    return tuple(sorted(entry.name.removesuffix(_SUFFIX) for entry in folder.iterdir()
                        if entry.name.endswith(_SUFFIX)))


def load_template(name: str) -> str:
    """The Jinja text of the built-in template ``name``.

    Args:
        name: one of :func:`template_names`.

    Returns:
        The template, as it is written into the tokenizer's ``chat_template``.

    Raises:
        KeyError: ``name`` is not a built-in template.
    """
    if name not in template_names():
        raise KeyError(name)
    return resources.files(__name__).joinpath(name + _SUFFIX).read_text(encoding="utf-8")


def template_problem(value: str) -> str | None:
    """Why ``chat_template: value`` is unusable, or None when it is ``auto``, a built-in name or a
    literal Jinja template (any text containing ``{``).

    Example:
        >>> template_problem("llama3") is None, template_problem("{{ messages }}") is None
        (True, True)
        >>> template_problem("llama-3")
        "'llama-3' is neither a built-in template nor a Jinja template; give one of auto, alpaca, \
chatml, exaone, llama3, mistral, zephyr, or the template's text"
    """
    if value == "auto" or value in template_names() or "{" in value:
        return None
    names = ", ".join(["auto", *template_names()])
    shown = value if len(value) <= 40 else value[:37] + "..."
    return (f"'{shown}' is neither a built-in template nor a Jinja template; give one of {names}, "
            "or the template's text")
