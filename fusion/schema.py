"""YAML values checked against the recipe's dataclasses and type annotations, with one-line errors.

`build` turns a mapping into a dataclass, refusing unknown keys and wrong types; `convert` checks one
value against one annotation (lightly coercing int -> float, list -> tuple), refusing NaN and infinity,
which no setting means. The recipe loader uses them for every section, and `fusion.methods` for a
module class's ``module_args``, so a mistake in either reads the same: the dotted key, what it must
be, and the fix.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from typing import Any, Literal, Union

from fusion.errors import FusionError


def build(cls: type, raw: Any, prefix: str) -> Any:
    """A dataclass of type `cls` from a YAML mapping, checking every key and type."""
    if not isinstance(raw, dict):
        raise FusionError(f"{prefix or 'recipe'}: expected a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    values = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names or key == "source_file":
            close = ", ".join(sorted(n for n in names if n != "source_file"))
            raise FusionError(f"unknown recipe key {dotted!r}: remove it or use one of: {close}")
        values[key] = convert(hints[key], value, dotted)
    required = [f.name for f in dataclasses.fields(cls)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in values]
    if missing:
        raise FusionError(f"recipe key {prefix}{missing[0]!r} is required: add it to the recipe")
    return cls(**values)


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def convert(tp: Any, value: Any, key: str) -> Any:
    """`value` checked (and lightly coerced: int → float, list → tuple) against the annotation `tp`."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if isinstance(value, float) and not math.isfinite(value):  # nothing in a recipe means infinity or NaN
        raise FusionError(f"recipe key {key!r} must be a finite number, got {value!r}: fix its value")
    if dataclasses.is_dataclass(tp):
        return build(tp, {} if value is None else value, f"{key}.")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return convert(option, value, key)
            except FusionError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp):
            return value
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict) and all(isinstance(k, str) for k in value):
            _, item = typing.get_args(tp)
            return {k: convert(item, v, f"{key}.{k}") for k, v in value.items()}
    elif origin is tuple:
        items = typing.get_args(tp)
        if isinstance(value, (list, tuple)) and len(value) == len(items):
            return tuple(convert(t, v, f"{key}[{i}]") for i, (t, v) in enumerate(zip(items, value)))
    elif tp is type(None):
        if value is None:
            return None
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+", value.strip()):
            return convert(tp, float(value), key)  # YAML 1.1 reads 3e-3 (no dot) as a string; 1e999 is inf
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):
        return value
    raise FusionError(f"recipe key {key!r} must be {type_name(tp)}, got {value!r}: fix its value")
