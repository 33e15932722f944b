"""Typed config sections: a frozen dataclass per section, filled from a config dict once.

An experiment config is an `ml_collections.ConfigDict`; the run turns each of
its sections into a frozen dataclass with `parse_section(cls, value, path)`,
which checks that every field is known, present (or has a default) and of its
annotated type, naming the config path (`optimizer.b1`) in every error. Range
rules that go beyond the type live in the dataclass's `__post_init__`, which
raises `ConfigError` through `require` and the checkers below.

Supported annotations: `int`, `float` (ints accepted), `bool`, `str`,
`X | None`, and `tuple[X, ...]` (lists accepted).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Mapping
from typing import Any


class ConfigError(ValueError):
    """An experiment config is wrong; the message names the field, the value and what is allowed."""


def plain(value):
    """ConfigDict / list values as plain Python: mappings become dicts, lists become tuples."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return tuple(plain(v) for v in value)
    return value


def flatten(config, prefix: str = "") -> dict[str, object]:
    """`{'a.b.c': value}` of a (nested) ConfigDict or mapping, lists as tuples."""
    out = {}
    for key, value in plain(config).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def require(condition: bool, path: str, value, allowed: str) -> None:
    """Raises `ConfigError('<path> must be <allowed>, got <value>')` unless `condition`."""
    if not condition:
        raise ConfigError(f"{path} must be {allowed}, got {value!r}")


def one_of(path: str, value, choices) -> None:
    require(value in choices, path, value, f"one of {choices}")


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(path: str, value) -> None:
    require(is_int(value) and value >= 1, path, value, "a positive int")


def non_negative_int(path: str, value) -> None:
    require(is_int(value) and value >= 0, path, value, "an int >= 0")


def positive_number(path: str, value) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    require(ok, path, value, "a positive number")


def _type_name(annotation) -> str:
    if annotation is type(None):
        return "None"
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        return f"a list of {_type_name(args[0])}"
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(_type_name(a) for a in args)
    return {int: "an int", float: "a number", bool: "a bool (True/False)", str: "a string"}.get(
        annotation, getattr(annotation, "__name__", str(annotation))
    )


def _convert(annotation, value, path: str):
    """`value` as `annotation` asks, or ConfigError naming `path`."""
    if annotation is Any:
        return value
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for option in typing.get_args(annotation):
            try:
                return _convert(option, value, path)
            except ConfigError:
                continue
        raise ConfigError(f"{path} must be {_type_name(annotation)}, got {value!r}")
    if annotation is type(None):
        require(value is None, path, value, "None")
        return None
    if typing.get_origin(annotation) is tuple:
        require(isinstance(value, (list, tuple)), path, value, _type_name(annotation))
        (item,) = {a for a in typing.get_args(annotation) if a is not Ellipsis}
        return tuple(_convert(item, v, f"{path}[{i}]") for i, v in enumerate(value))
    if annotation is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, path, value, "a number")
        return float(value)
    if annotation is int:
        require(is_int(value), path, value, "an int")
        return value
    if annotation in (bool, str):
        require(isinstance(value, annotation), path, value, _type_name(annotation))
        return value
    raise TypeError(f"{path}: unsupported section annotation {annotation!r}")


def parse_section(cls: type, value, path: str):
    """A `cls` instance (a frozen dataclass) from the config section `value` at `path`.

    Raises:
      ConfigError: `value` is not a mapping, has a field `cls` does not know,
        lacks one without a default, or holds a value of the wrong type; and
        whatever `cls.__post_init__` rejects.
    """
    value = plain(value)
    if not isinstance(value, dict):
        raise ConfigError(f"{path} must be a section (a dict of fields), got {value!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(value) - set(fields))
    if unknown:
        raise ConfigError(f"{path}: unknown field(s) {unknown}; the fields are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, field in fields.items():
        if name not in value:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise ConfigError(f"{path}.{name} is missing ({_type_name(hints[name])})")
            continue
        kwargs[name] = _convert(hints[name], value[name], f"{path}.{name}")
    return cls(**kwargs)
