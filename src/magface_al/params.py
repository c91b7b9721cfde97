"""Typed, validated access to ``params.yaml`` sections.

Each stage describes its section as a dataclass and calls :func:`load_section`.
Values are converted to the field's annotated type, so a float that DVC wrote
back as ``1e-05`` (a string to a YAML 1.1 parser) still arrives as a float,
and anything that does not convert is rejected with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS_FILE = "params.yaml"


class ParamsError(ValueError):
    """A params.yaml value is missing, unknown or of the wrong type."""


def read_params(path: str | os.PathLike = DEFAULT_PARAMS_FILE) -> dict[str, Any]:
    """Read the whole params file as a mapping."""
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"params file not found: {path}. Run the stage from the project root.")
    with path.open(encoding="utf-8") as handle:
        data = yaml.safe_load(handle) or {}
    if not isinstance(data, dict):
        raise ParamsError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _convert(value: Any, annotation: Any, name: str) -> Any:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)

    if annotation is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, name)
            except ParamsError as error:
                errors.append(str(error))
        raise ParamsError(errors[0] if errors else f"{name}: invalid value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            allowed = ", ".join(repr(a) for a in args)
            raise ParamsError(f"{name}: invalid value {value!r}; expected one of {allowed}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"{name}: expected a list, got {value!r}")
        item_type = args[0] if args else Any
        converted = [_convert(v, item_type, f"{name}[{i}]") for i, v in enumerate(value)]
        return converted if origin is list else tuple(converted)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ParamsError(f"{name}: expected a mapping, got {value!r}")
        return from_mapping(annotation, value, name)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
        raise ParamsError(f"{name}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ParamsError(f"{name}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ParamsError(f"{name}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ParamsError(f"{name}: expected a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ParamsError(f"{name}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ParamsError(f"{name}: expected a string, got {value!r}")
    return value


def from_mapping(cls: type[T], raw: dict[str, Any], name: str) -> T:
    """Build dataclass ``cls`` from ``raw``, converting and checking every field.

    Unknown keys are rejected, because a misspelt key would otherwise be
    silently ignored while its default is used.
    """
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ParamsError(
            f"{name}: unknown key(s) {', '.join(unknown)}; expected some of {', '.join(fields)}"
        )
    values = {}
    for field_name, field in fields.items():
        key = f"{name}.{field_name}"
        if field_name in raw:
            values[field_name] = _convert(raw[field_name], hints[field_name], key)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ParamsError(f"{key}: missing; add it to params.yaml")
    return cls(**values)


def load_section(cls: type[T], section: str, path: str | os.PathLike = DEFAULT_PARAMS_FILE) -> T:
    """Load ``section`` of the params file (dots address nested sections) into ``cls``."""
    node: Any = read_params(path)
    for part in section.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ParamsError(f"{path}: section {section!r} is missing")
        node = node[part]
    if not isinstance(node, dict):
        raise ParamsError(f"{path}: section {section!r} must be a mapping, got {node!r}")
    return from_mapping(cls, node, section)
