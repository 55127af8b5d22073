"""Parsing and printing memory sizes."""

from __future__ import annotations

import re

from autoquant.core.errors import AutoquantError

GB = 10**9
GiB = 1024**3
MiB = 1024**2

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
    "k": 1024,
    "m": 1024**2,
    "g": 1024**3,
    "t": 1024**4,
}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(text: str) -> int:
    """Parse a size such as ``8GB``, ``8GiB``, ``8192MB`` or ``1.5G`` into bytes.

    ``GB`` is 10**9 bytes and ``GiB`` 2**30, as printed on spec sheets and by tools respectively;
    a bare ``G`` is read as GiB because that is what ``nvidia-smi``-style listings mean by it.
    """
    match = _SIZE.match(text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise AutoquantError(
            f"cannot read size {text!r}: write a number with a unit, e.g. 8GB, 8GiB or 8192MB"
        )
    value = float(match.group(1)) * _UNITS[unit]
    if value <= 0:
        raise AutoquantError(f"size {text!r} must be greater than zero")
    return int(value)


def format_bytes(n: int | float) -> str:
    """Human-readable size in binary units (GiB/MiB), the units CUDA memory tools report."""
    if abs(n) >= GiB:
        return f"{n / GiB:.2f} GiB"
    if abs(n) >= MiB:
        return f"{n / MiB:.1f} MiB"
    return f"{int(n)} B"
