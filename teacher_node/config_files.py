"""Reading TOML config files into pydantic models, with errors that name the dotted key.

Shared by ``teacher.toml`` (teacher node) and ``run.toml`` (coordinator).
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from cdfkd.protos.errors import CdfkdError

Model = TypeVar("Model", bound=BaseModel)


def _location(location: tuple[int | str, ...], union_tags: frozenset[str]) -> tuple[int | str, ...]:
    """Drop the tag pydantic inserts after a list index for a discriminated union member."""
    kept: list[int | str] = []
    for index, part in enumerate(location):
        after_index = index > 0 and isinstance(location[index - 1], int)
        if not (after_index and part in union_tags):
            kept.append(part)
    return tuple(kept)


def describe_validation_error(
    error: ValidationError, union_tags: frozenset[str] = frozenset()
) -> str:
    """One line per problem, each naming its dotted key ('unknown key a.b', 'a.c': message)."""
    items = [(item, _location(item["loc"], union_tags)) for item in error.errors()]
    nested = {location[0] for _, location in items if len(location) > 1}
    problems = []
    for item, location in items:
        if item["type"] == "too_short" and len(location) == 1 and location[0] in nested:
            continue  # a list emptied by its own invalid items: the nested error says why
        key = ".".join(str(part) for part in location) or "<root>"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key '{key}'")
        else:
            problems.append(f"'{key}': {item['msg']}")
    return "; ".join(problems)


def validate(
    model: type[Model],
    data: dict[str, Any],
    what: str,
    error: type[CdfkdError],
    union_tags: frozenset[str] = frozenset(),
) -> Model:
    """``model.model_validate(data)``, raising ``error`` with every offending dotted key.

    ``union_tags`` are the tags of discriminated unions in lists, left out of the key names.
    """
    try:
        return model.model_validate(data)
    except ValidationError as problem:
        details = describe_validation_error(problem, union_tags)
        raise error(f"invalid {what}: {details}") from problem


def read_toml(path: Path, error: type[CdfkdError]) -> dict[str, Any]:
    """Parse a TOML file, raising ``error`` for a missing, unreadable or malformed file."""
    try:
        return tomllib.loads(Path(path).read_text())
    except FileNotFoundError as problem:
        raise error(f"config file {path} not found") from problem
    except (OSError, UnicodeDecodeError) as problem:
        raise error(f"config file {path} cannot be read: {problem}") from problem
    except tomllib.TOMLDecodeError as problem:
        raise error(f"config file {path} is not valid TOML: {problem}") from problem


def resolve_path(path: Path | None, base: Path) -> Path | None:
    """``path`` relative to ``base`` unless absolute; None stays None."""
    return path if path is None or path.is_absolute() else base / path
