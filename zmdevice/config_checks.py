"""The checks every config value passes: its type (``check_fields``, ``checked_value``), its
range (``require``, ``at_least``, ``check_choice``) and the device name (``check_device``).

A bad value is a ``ConfigError`` naming the key; ``config_files.load_config`` adds which
flag or file gave it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from pathlib import Path
from typing import Any

from zmdevice.errors import UserError

DEVICES = ("auto", "cpu", "cuda", "mps")


class ConfigError(UserError):
    """A bad value of one field; ``load_config`` adds which flag or file gave it."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def check_device(device: str) -> str:
    """Accept auto, cpu, cuda, cuda:N or mps; anything else is a user error."""
    if not isinstance(device, str):
        raise ConfigError(
            "device", f"device must be a string (auto, cpu, cuda, cuda:N, mps), got {shown(device)}"
        )
    base = device.split(":", 1)[0]
    if base not in DEVICES or (":" in device and not (base == "cuda" and device[5:].isdigit())):
        raise ConfigError(
            "device", f"unknown device '{device}': use one of auto, cpu, cuda, cuda:N, mps"
        )
    return device


def shown(value: Any) -> str:
    """``value`` for a one-line message: its repr when short, else its type."""
    text = repr(value)
    return f"a {type(value).__name__}" if len(text) > 60 or "\n" in text else text


def _is_int(value: Any) -> bool:
    # numbers.Integral takes numpy's integers too; bool is an int to Python, not to us.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _as_path(value: Any) -> Path:
    return Path(value)


FIELD_TYPES = {
    "int": ("an integer", _is_int, int),
    "float": ("a number", _is_number, float),
    "str": ("a string", lambda v: isinstance(v, str), str),
    "Path": ("a path", lambda v: isinstance(v, str | os.PathLike), _as_path),
    "bool": ("true or false", lambda v: isinstance(v, bool), bool),
    "list[str]": (
        "a list of strings",
        lambda v: isinstance(v, list | tuple) and all(isinstance(item, str) for item in v),
        list,
    ),
    # Checked by name: the dataclass lives in zmdevice.config, which builds on this module.
    "DataOptions": ("a DataOptions", lambda v: type(v).__name__ == "DataOptions", lambda v: v),
}
"""Each annotation a config field may have: what it is called in a message, the test a value
must pass, and the conversion to the one type the stages see (Path, int, float, list)."""

INT64 = 2**63


def checked_value(key: str, value: Any, annotation: str) -> Any:
    """``value`` converted to the field's type; a ``ConfigError`` naming ``key`` when it has
    the wrong type (None where it is not allowed included), is not finite, or does not fit
    in 64 bits (what torch, numpy and the checkpoint files hold)."""
    options = [part.strip() for part in annotation.split("|")]
    if value is None and "None" in options:
        return None
    kinds = [option for option in options if option != "None"]
    for kind in kinds:
        _, fits, convert = FIELD_TYPES[kind]
        if not fits(value):
            continue
        value = convert(value)
        if kind == "int" and not -INT64 <= value < INT64:
            raise ConfigError(key, f"{key} must fit in 64 bits (-2**63 to 2**63 - 1), got {value}")
        if kind == "float" and not math.isfinite(value):
            raise ConfigError(key, f"{key} must be a finite number, got {value}")
        return value
    expected = " or ".join(FIELD_TYPES[kind][0] for kind in kinds)
    # A string is never read as a number (as in a --config file): say so, it looks alike.
    string = " (a string)" if isinstance(value, str) else ""
    raise ConfigError(key, f"{key} must be {expected}, got {shown(value)}{string}")


def check_fields(config) -> None:
    """Check the type of every field of a config dataclass and convert it in place (see
    ``checked_value``). Runs first in ``__post_init__``, so that range checks compare
    numbers with numbers."""
    for item in dataclasses.fields(config):
        value = checked_value(item.name, getattr(config, item.name), str(item.type))
        object.__setattr__(config, item.name, value)


def require(config, key: str, ok: bool, expected: str) -> None:
    """Raise a ``ConfigError`` for ``key`` unless ``ok``: '<key> must be <expected>, got <v>'."""
    if not ok:
        raise ConfigError(key, f"{key} must be {expected}, got {getattr(config, key)!r}")


def check_choice(config, key: str, choices) -> None:
    """``key`` is one of ``choices``."""
    require(config, key, getattr(config, key) in choices, f"one of {', '.join(choices)}")


def at_least(config, minimum, *keys: str) -> None:
    """Each of ``keys`` is None or >= ``minimum``."""
    for key in keys:
        value = getattr(config, key)
        require(config, key, value is None or value >= minimum, f">= {minimum}")


def check_type(key: str, value: Any, annotation: str, source: str) -> None:
    """UserError naming ``key`` and ``source`` unless ``value`` fits ``annotation``."""
    # Ranges (finite, 64-bit) are the dataclass's to check; load_config names the file then.
    kinds = [part.strip() for part in annotation.split("|") if part.strip() != "None"]
    if any(FIELD_TYPES[kind][1](value) for kind in kinds):
        return
    expected = " or ".join(FIELD_TYPES[kind][0] for kind in kinds)
    raise UserError(f"{source}: {key} = {shown(value)} must be {expected}")
