"""Reading a service's frozen config dataclass from environment variables (RECSYS_<SERVICE>_<FIELD>)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    pass


def _parse(var: str, raw: str, kind: Any) -> Any:
    if isinstance(kind, types.UnionType) or typing.get_origin(kind) is typing.Union:
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if raw == "":
            return None
        kind = args[0]
    try:
        if kind is bool:
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind in (int, float, str, Path):
            return kind(raw)
        if typing.get_origin(kind) is tuple:
            return tuple(part.strip() for part in raw.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"Config {var!r} has value {raw!r}. Not a valid {kind.__name__}.") from None
    raise ConfigError(f"Config {var!r}: fields of type {kind} cannot be read from the environment")


def from_env(cls: type[T], prefix: str, environ: Mapping[str, str]) -> T:
    """Build cls from its defaults, overridden by ``{prefix}{FIELD_NAME_UPPER}`` variables."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        var = f"{prefix}{f.name.upper()}"
        if var in environ:
            values[f.name] = _parse(var, environ[var], hints[f.name])
    return cls(**values)


def check_positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"Config {name!r} has value {value!r}. Must be > 0.")
