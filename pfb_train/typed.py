"""Config values checked against dataclass field types: the one rule for every config key, the run's
sections (config.py) and each selection method's own options (selection/registry.py) alike.

A leaf module (it imports only errors.py), so that both can import it at the top.
"""

from __future__ import annotations

import difflib
import typing
from typing import Literal, Union

from pfb_train.errors import UserError


def type_name(tp) -> str:
    """How messages call a field type: `int`, `one of 'a', 'b'`, `float or null`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join("null" if a is type(None) else type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    return tp.__name__


def coerce(value, tp, key: str):
    """`value` as type `tp` (bool, int, float, str, a Literal, a list of one of them, Optional/Union of them); an int is taken
    as a float, and a string that reads as a float too (YAML 1.1 reads "1e-4" as a string).
    Raises a one-line UserError naming the config `key` and the expected type otherwise."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except UserError:
                pass
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [coerce(v, item, key) for v in value]
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    raise UserError(f"config key '{key}': expected {type_name(tp)}, got {value!r}")


def unknown_key(key: str, prefix: str, valid: list[str]) -> UserError:
    """The one-line error for a key that is not in `valid`: the closest key, or else the valid ones."""
    full = f"{prefix}{key}"
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(valid)})"
    return UserError(f"unknown config key '{full}'{hint}")


def coerce_fields(cls, data: dict, prefix: str) -> dict:
    """`data`'s values typed by the dataclass `cls`'s fields (keys already known to be fields);
    a wrong type raises a UserError naming `prefix.key`."""
    hints = typing.get_type_hints(cls)
    return {key: coerce(value, hints[key], f"{prefix}.{key}") for key, value in data.items()}
