"""The API's argument checks: a wrong type raises TypeError, a value out of range
``ConfigError`` (a ValueError), before anything is contacted."""

from __future__ import annotations

import math
import numbers
from typing import Any

from .errors import ConfigError


def seconds(name: str, value: Any) -> float | None:
    """A duration argument: None, or a finite number of seconds above 0."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number of seconds or None, not {type(value).__name__} {value!r}")
    if not 0 < value < math.inf:
        raise ConfigError(f"{name} must be a finite number of seconds above 0, not {value!r}")
    return float(value)


def count(name: str, value: Any, least: int) -> int:
    """A count argument: an int of at least ``least``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, not {type(value).__name__} {value!r}")
    if value < least:
        raise ConfigError(f"{name} must be at least {least}, not {value!r}")
    return int(value)


def map_args(chunksize, timeout, retries) -> tuple:
    """A map's ``chunksize``, ``timeout`` and ``retries``, checked."""
    return (None if chunksize is None else count("chunksize", chunksize, 1), seconds("timeout", timeout),
            count("retries", retries, 0))
