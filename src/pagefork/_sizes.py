"""Parsing and rounding of byte sizes."""

from __future__ import annotations

import operator
import re
from fractions import Fraction

from . import _native

PAGE_SIZE: int = _native.PAGE_SIZE

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "kib": 1 << 10,
    "m": 1000**2, "mb": 1000**2, "mib": 1 << 20,
    "g": 1000**3, "gb": 1000**3, "gib": 1 << 30,
    "t": 1000**4, "tb": 1000**4, "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str, what: str = "size") -> int:
    """Returns ``value`` in bytes: an int, or a string like ``"64MiB"`` or ``"1.5 GB"``."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an int or a string like '64MiB', not bool")
    if isinstance(value, str):
        match = _SIZE.match(value)
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ValueError(f"{what}: cannot parse {value!r} (use e.g. 4096, '64KiB', '1GiB')")
        return int(Fraction(match.group(1)) * _UNITS[unit])  # exact: no float rounding or inf
    try:
        value = operator.index(value)  # any integer: int, numpy.int64, ...
    except TypeError:
        raise TypeError(f"{what} must be an int or a string like '64MiB', "
                        f"not {type(value).__name__}") from None
    if value < 0:
        raise ValueError(f"{what} must not be negative, got {value}")
    return value


def as_index(value: object, what: str) -> int:
    """``value`` as a Python int: any integer (``operator.index``: int,
    numpy.int64, ...), never a bool, a float or a string."""
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, not bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{what} must be an integer, not {type(value).__name__}") from None


def round_to_pages(n: int) -> int:
    """Rounds a byte count up to whole pages."""
    return -(-n // PAGE_SIZE) * PAGE_SIZE
