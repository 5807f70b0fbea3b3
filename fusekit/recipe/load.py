"""Load a YAML recipe into pydantic models, reporting every problem with ``file:line:col``.

YAML is parsed with the safe loader and the node tree is walked once to remember where each key and
value stands, so a pydantic error location such as ``('models', 1, 'parameters')`` becomes
``recipe.yaml:7:5 models[1].parameters: ...``. Unknown keys come with the nearest valid key.
"""

from __future__ import annotations

import difflib
import re
import typing
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from fusekit.errors import RecipeError
from fusekit.io.userfiles import RECIPE_LIMIT, UserFileError, read_user_text
from fusekit.recipe.kind import other_kind_error

Location = tuple[str | int, ...]
ModelT = TypeVar("ModelT", bound=BaseModel)

# Aliases can expand exponentially ("billion laughs"); recipes never need many.
_MAX_ALIASES = 100
_MAX_INT_CHARS = 1000  # 10**1000 is beyond every float; Python refuses int() past 4300 digits
_MAX_NODES = 100_000  # values in the expanded document; real recipes have a few hundred


@dataclass(frozen=True)
class RecipeSource:
    """Where a recipe came from and where each of its values stands in the file."""

    name: str
    marks: dict[Location, tuple[int, int]]

    def where(self, loc: Location) -> str:
        """``file:line:col`` for the deepest known prefix of ``loc``."""
        for end in range(len(loc), -1, -1):
            mark = self.marks.get(loc[:end])
            if mark is not None:
                return f"{self.name}:{mark[0]}:{mark[1]}"
        return self.name


def format_location(loc: Iterable[str | int]) -> str:
    """``('models', 1, 'parameters')`` → ``models[1].parameters``."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def short_repr(value: Any, limit: int = 80) -> str:
    """``repr(value)`` cut to about ``limit`` characters, so an error quoting a huge value stays short.

    >>> short_repr("x" * 200, limit=10)
    "'xxxxxxx... (202 characters)"
    """
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's digit limit for str()
        return "an integer of thousands of digits"
    return text if len(text) <= limit else f"{text[:limit - 2]}... ({len(text)} characters)"


def _collect_marks(node: yaml.Node, loc: Location, marks: dict[Location, tuple[int, int]],
                   counter: list[int]) -> None:
    """Record 1-based line/column of every node; refuse duplicate keys and alias bombs."""
    marks.setdefault(loc, (node.start_mark.line + 1, node.start_mark.column + 1))
    counter[0] += 1
    if counter[0] > _MAX_NODES:
        raise _DuplicateKey("the document is too large or expands aliases too far", loc)
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):  # `? [a, b]`: unhashable, never a recipe key
                raise _DuplicateKey("a key must be a plain name, not a list or mapping", loc)
            key = key_node.value
            if key in seen:
                line = key_node.start_mark.line + 1
                raise _DuplicateKey(f"key '{key}' appears twice (line {line}); keep one of them", loc)
            seen.add(key)
            marks[(*loc, key)] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            _collect_marks(value_node, (*loc, key), marks, counter)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _collect_marks(item, (*loc, index), marks, counter)


class _DuplicateKey(Exception):
    def __init__(self, message: str, loc: Location) -> None:
        super().__init__(message)
        self.loc = loc


class _CountingLoader(yaml.SafeLoader):
    """Safe loader that refuses documents using more aliases than any recipe needs, and reads
    ``1e-3`` as a float (YAML 1.2) rather than a string (YAML 1.1)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.alias_count = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.alias_count += 1
            if self.alias_count > _MAX_ALIASES:
                mark = self.peek_event().start_mark
                raise yaml.constructor.ConstructorError(
                    None, None, f"more than {_MAX_ALIASES} YAML aliases; expand them by hand", mark)
        return super().compose_node(parent, index)


    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """An integer, refusing ones too long for Python to convert (more than 4300 digits)."""
        if len(node.value) > _MAX_INT_CHARS:
            raise yaml.constructor.ConstructorError(
                None, None, f"an integer of {len(node.value)} digits is far outside any range a recipe "
                f"accepts; write a number of at most {_MAX_INT_CHARS} digits", node.start_mark)
        return int(super().construct_yaml_int(node))


_CountingLoader.add_constructor("tag:yaml.org,2002:int", _CountingLoader.construct_yaml_int)
_CountingLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."))


def parse_yaml(text: str, name: str) -> tuple[Any, RecipeSource]:
    """Parse YAML text holding one document safely; return the data and the line marks of every value.

    A file of several documents (``---``) is refused with a line saying where the second starts: only
    merge recipes may hold several (stages, see :mod:`fusekit.recipe.stages`).
    """
    documents = parse_yaml_documents(text, name)
    if not documents:
        raise RecipeError(f"{name}: the recipe is empty; see configs/ for examples")
    if len(documents) > 1:
        line = documents[1][1].marks.get((), (1, 1))[0]
        raise RecipeError(f"{name}:{line}:1 a second YAML document starts here ('---'); only `fusekit "
                          "merge` and `fusekit plan` take multi-stage recipes, keep one document")
    data, source = documents[0]
    if not isinstance(data, dict):
        raise RecipeError(f"{name}:1:1 a recipe must be a mapping of keys such as merge_method and "
                          f"models, got {type(data).__name__}")
    return data, source


def parse_yaml_documents(text: str, name: str) -> list[tuple[Any, RecipeSource]]:
    """Parse every YAML document of ``text`` (separated by ``---``) safely; empty ones are skipped.

    Returns:
        (data, source) per document, in file order; every document's line marks count from the top
        of the file, and ``source.marks[()]`` is where the document starts.

    Raises:
        RecipeError: malformed YAML, a duplicate key, or an alias bomb, naming the file and line.
    """
    try:
        loader = _CountingLoader(text)
    except yaml.YAMLError as exc:  # the reader refuses control characters before parsing starts
        raise RecipeError(f"{name}: malformed YAML: {str(exc).splitlines()[0]}") from None
    documents: list[tuple[Any, RecipeSource]] = []
    marks: dict[Location, tuple[int, int]] = {}
    try:
        while loader.check_node():
            node, marks = loader.get_node(), {}
            _collect_marks(node, (), marks, [0])
            data = loader.construct_document(node)
            if data is not None:
                documents.append((data, RecipeSource(name, marks)))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name}:{mark.line + 1}:{mark.column + 1}" if mark else name
        problem = exc.problem or exc.context or "invalid YAML"
        raise RecipeError(f"{where} malformed YAML: {problem}") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{name}: malformed YAML: {exc}") from None
    except _DuplicateKey as exc:
        raise RecipeError(f"{RecipeSource(name, marks).where(exc.loc)} {exc}") from None
    except RecursionError:
        raise RecipeError(f"{name}: the YAML nests too deeply; a recipe needs only a few levels") from None
    finally:
        loader.dispose()
    return documents


def _model_class_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model class nested anywhere in ``annotation`` (list[X], X | None, ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_class_in(arg)
        if found is not None:
            return found
    return None


def _model_at(root: type[BaseModel], loc: Sequence[str | int]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):
            continue
        if model is None or part not in model.model_fields:
            return None
        model = _model_class_in(model.model_fields[part].annotation)
    return model


def suggest(word: str, choices: Iterable[str]) -> str:
    """``"; did you mean 'x'?"`` for the closest choice, or a list of valid ones."""
    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; valid keys: {', '.join(choices)}" if choices else ""


def _data_path(data: Any, loc: Sequence[str | int]) -> Location:
    """Keep the parts of a pydantic location that address real data (drop union tags)."""
    path: list[str | int] = []
    node = data
    for part in loc:
        in_dict = isinstance(node, dict) and part in node
        in_list = isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node)
        if in_dict or in_list:
            node = node[part]
            path.append(part)
    return tuple(path)


def _describe(root: type[BaseModel], data: Any, error: Any, source: RecipeSource) -> str:
    path = _data_path(data, error["loc"])
    message = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        key = str(error["loc"][-1])
        model = _model_at(root, path[:-1])
        fields = model.model_fields if model else {}
        message = f"unknown key {short_repr(key)}{suggest(key, fields)}"
    elif error["type"] == "missing":
        path = _data_path(data, error["loc"][:-1])
        message = f"required key '{error['loc'][-1]}' is missing"
    elif "input" in error and error["type"] not in ("value_error", "assertion_error"):
        message = f"{message}, got {short_repr(error['input'])}"
    label = format_location(path)
    return f"{source.where(path)} {label + ': ' if label else ''}{message}"


def validate(root: type[ModelT], data: Any, source: RecipeSource,
             checks: Callable[[ModelT], list[tuple[Location, str]]] | None = None) -> ModelT:
    """Validate ``data`` as ``root``; every problem in one :class:`RecipeError` (see :func:`join_problems`).

    A recipe of another kind (an MoE recipe given to the merge loader, say) is one line naming the
    command that reads it (:mod:`fusekit.recipe.kind`), not a list of unknown and missing keys.
    """
    wrong = other_kind_error(data, root.model_fields, source.name)
    if wrong is not None:
        raise RecipeError(f"{source.where(wrong[0])} {wrong[1]}")
    try:
        recipe = root.model_validate(data)
    except ValidationError as exc:
        lines = [_describe(root, data, err, source) for err in exc.errors()]
        raise RecipeError(join_problems(lines, source.name)) from None
    raise_problems(checks(recipe) if checks else [], source)
    return recipe


def raise_problems(problems: Sequence[tuple[Location, str]], source: RecipeSource) -> None:
    """Raise one RecipeError listing ``problems`` (location, message), each with its file:line; no-op
    when there are none."""
    if problems:
        lines = []
        for loc, message in problems:
            label = format_location(loc)
            lines.append(f"{source.where(loc)} {label + ': ' if label else ''}{message}")
        raise RecipeError(join_problems(lines, source.name))


MAX_LISTED_PROBLEMS = 20
"""Problems listed one per line at most; the rest are counted."""


_LINE_BREAKS = frozenset("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")  # what str.splitlines splits on


def _one_line(text: str) -> str:
    """``text`` with every character that would break it into lines (a key may hold any) escaped."""
    return "".join(ascii(c)[1:-1] if c in _LINE_BREAKS else c for c in text)


def join_problems(lines: list[str], name: str) -> str:
    """One problem as its line; several as a first line counting them, then one per line in file order.

    Example:
        >>> print(join_problems(["r.yaml:2:1 a: bad", "r.yaml:3:1 b: bad"], "r.yaml"))
        2 problems in r.yaml:
          r.yaml:2:1 a: bad
          r.yaml:3:1 b: bad
    """
    unique = list(dict.fromkeys(_one_line(line) for line in lines))
    if len(unique) == 1:
        return unique[0]
    position = re.compile(re.escape(name) + r":(\d+):(\d+) ")

    def where(line: str) -> tuple[int, int]:
        found = position.match(line)
        return (int(found[1]), int(found[2])) if found else (0, 0)

    unique.sort(key=where)
    shown = [f"  {line}" for line in unique[:MAX_LISTED_PROBLEMS]]
    if len(unique) > MAX_LISTED_PROBLEMS:
        shown.append(f"  ... and {len(unique) - MAX_LISTED_PROBLEMS} more; fix these and run again")
    return f"{len(unique)} problems in {name}:\n" + "\n".join(shown)


def load_recipe(path: Path | str, root: type[ModelT],
                checks: Callable[[ModelT], list[tuple[Location, str]]] | None = None,
                ) -> tuple[ModelT, RecipeSource]:
    """Read, parse and validate a YAML recipe file as ``root``; one RecipeError naming file and line."""
    path = Path(path)
    return parse_recipe(read_recipe_text(path), str(path), root, checks)


def parse_recipe(text: str, name: str, root: type[ModelT],
                 checks: Callable[[ModelT], list[tuple[Location, str]]] | None = None,
                 ) -> tuple[ModelT, RecipeSource]:
    """Like :func:`load_recipe` for YAML text held in memory."""
    data, source = parse_yaml(text, name)
    return validate(root, data, source, checks), source


def read_recipe_text(path: Path) -> str:
    """The recipe file's text, at most :data:`~fusekit.io.userfiles.RECIPE_LIMIT` bytes of a regular
    file, or a one-line error naming the file."""
    try:
        return read_user_text(path, what="recipe", limit=RECIPE_LIMIT)
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found; check the path") from None
    except NotADirectoryError:
        raise RecipeError(f"{path}: recipe file not found (a part of the path is a file, not a "
                          "folder); check the path") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: is not UTF-8 text; a recipe is a YAML file") from None
    except PermissionError:
        raise RecipeError(f"{path}: permission denied; make the recipe readable") from None
    except OSError as exc:
        raise RecipeError(f"{path}: the recipe cannot be read ({exc.strerror or exc})") from None
    except UserFileError as exc:
        raise RecipeError(str(exc)) from None
