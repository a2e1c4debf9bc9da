"""A `params.yaml` section as a frozen dataclass: `from_dict` checks the section's keys and
each value against its field's type hint, and fails with one `UserError` that names the
file, the key and what is allowed. `params` and `model` declare the dataclasses."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from pipeline.errors import UserError


def from_dict(cls: type, data: Any, where: str):
    """Build dataclass `cls` from `data`, checking keys and types; errors name `where.key`."""
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        raise UserError(f"{where}: unknown key(s) {sorted(unknown)}; allowed: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: check_value(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except ValueError as exc:
        raise UserError(f"{where}: {exc}") from None


def check_value(value: Any, hint: Any, where: str) -> Any:
    """Check `value` against a simple type hint (int, float, str, bool, Literal, Optional)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return check_value(value, inner[0], where)
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise UserError(
                f"{where}: {value!r} is not allowed; use one of {', '.join(map(str, allowed))}"
            )
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise UserError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise UserError(f"{where}: expected a string, got {value!r}")
        return value
    return value
