"""Typed, self-checking parameter dataclasses: the machinery every parameter section shares.

A section is a dataclass whose ClassVar `section` is its key in a parameter file ("pretrain", "data", ...) and
whose `__post_init__` calls `check_types(self)` and then its range checks (`require`). So a section is checked
wherever it is made: from a whole parameter file, from a plain dict with `build`, or by calling the class.
Every error is a ParamError whose message starts with the full key (`pretrain.mask_ratio: ...`).
"""

from __future__ import annotations

import dataclasses
import functools
import typing


class ParamError(ValueError):
    """A parameter file or parameter value is invalid; the message says which and how to fix it."""


def _check_value(value, tp, where: str):
    """Return value converted to type tp, or raise ParamError naming the key and expected type."""
    origin = typing.get_origin(tp)
    if origin is list:
        if not isinstance(value, list):
            raise ParamError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_check_value(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is dict:
        if not isinstance(value, dict):
            raise ParamError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamError(f"{where}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ParamError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported schema type {tp}")


@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def key(obj, name: str) -> str:
    """The full key of field `name` of section `obj`, e.g. 'pretrain.mask_ratio'."""
    section = getattr(obj, "section", "")
    return f"{section}.{name}" if section else name


def check_types(obj) -> None:
    """Check (and convert: an int for a float) every field of dataclass `obj` against its annotation."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        tp, value, where = hints[f.name], getattr(obj, f.name), key(obj, f.name)
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, tp):
                raise ParamError(f"{where}: expected a {tp.__name__} (a mapping of keys), got {value!r}")
        else:
            object.__setattr__(obj, f.name, _check_value(value, tp, where))


def require(obj, name: str, ok: bool, expect: str) -> None:
    """Raise ParamError '<section>.<name>: must be <expect>, got <value>' unless `ok`."""
    if not ok:
        raise ParamError(f"{key(obj, name)}: must be {expect}, got {getattr(obj, name)!r}")


def one_of(obj, name: str, choices) -> None:
    require(obj, name, getattr(obj, name) in choices, f"one of {', '.join(map(str, choices))}")


def at_least(obj, name: str, low) -> None:
    require(obj, name, getattr(obj, name) >= low, f"at least {low}")


def positive(obj, name: str) -> None:
    require(obj, name, getattr(obj, name) > 0, "positive")


def build(cls, values: dict, where: str = ""):
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types (nested sections are
    built from nested mappings); the class's own checks then run as it is made. `where` is the key the
    mapping sits under, used in messages (a section found under another key is reported under that key)."""
    if not isinstance(values, dict):
        raise ParamError(f"{where or 'parameters'}: expected a mapping of keys, got {values!r}")
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for name, value in values.items():
        path = f"{where}.{name}" if where else name
        if name not in names:
            raise ParamError(
                f"unknown parameter {path!r}; valid parameters{' in ' + repr(where) if where else ''}: "
                f"{', '.join(names)}"
            )
        tp = hints[name]
        kwargs[name] = build(tp, value, path) if dataclasses.is_dataclass(tp) else _check_value(value, tp, path)
    section = getattr(cls, "section", "")
    try:
        return cls(**kwargs)
    except ParamError as e:
        msg = str(e)
        if where and section and where != section and msg.startswith(section + "."):
            raise ParamError(where + msg[len(section) :]) from None
        raise
