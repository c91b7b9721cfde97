"""Typed, validated access to ``params.yaml`` sections.

Each stage describes its section as a dataclass and calls :func:`load_section`.
Values are converted to the field's annotated type, so a float that DVC wrote
back as ``1e-05`` (a string to a YAML 1.1 parser) still arrives as a float,
and anything that does not convert is rejected with an error naming the key.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

DEFAULT_PARAMS_FILE = "params.yaml"

# When set to a file path, every params lookup is appended to that file as one
# JSON line, so a test can compare what each stage reads with what it declares
# in dvc.yaml. Unset (the normal case), read_params returns a plain dict.
TRACE_ENV = "MAGFACE_AL_PARAMS_TRACE"


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
    trace_file = os.environ.get(TRACE_ENV)
    if trace_file:
        return _TracedMapping(data, "", Path(trace_file))
    return data


class _TracedMapping(dict):
    """A params mapping that logs each lookup to a trace file (see ``TRACE_ENV``).

    Looking up a key logs its dotted path, with kind ``node`` when the value is
    a mapping (the caller may only descend into it) and ``value`` otherwise.
    Iterating over the mapping logs its own path as a ``value``: the caller has
    seen every key below it.
    """

    def __init__(self, data: dict, prefix: str, trace_file: Path) -> None:
        super().__init__(data)
        self._prefix = prefix
        self._trace_file = trace_file

    def _path(self, key: Any) -> str:
        return f"{self._prefix}.{key}" if self._prefix else str(key)

    def _record(self, path: str, kind: str) -> None:
        entry = {"path": path, "section": path.split(".")[0], "kind": kind, "argv": sys.argv, "cwd": os.getcwd()}
        with self._trace_file.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps(entry) + "\n")

    def _wrap(self, key: Any, value: Any) -> Any:
        path = self._path(key)
        if isinstance(value, dict):
            self._record(path, "node")
            return _TracedMapping(value, path, self._trace_file)
        self._record(path, "value")
        return value

    def _record_whole(self) -> None:
        self._record(self._prefix or "<all params>", "value")

    def __getitem__(self, key: Any) -> Any:
        return self._wrap(key, super().__getitem__(key))

    def get(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            self._record(self._path(key), "value")
            return default
        return self[key]

    def __iter__(self):
        self._record_whole()
        return super().__iter__()

    def keys(self):
        self._record_whole()
        return super().keys()

    def values(self):
        self._record_whole()
        return [self[key] for key in super().keys()]

    def items(self):
        self._record_whole()
        return [(key, self[key]) for key in super().keys()]


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
