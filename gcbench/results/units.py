"""Byte counts as people write them: ``11GiB`` in, ``11.00 GiB`` out."""

from __future__ import annotations

import re

from gcbench.errors import UsageError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
BINARY_UNITS = (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))


def bytes_from(text: str | int) -> int:
    """``11GiB``, ``512MiB``, ``24GB``, ``1048576`` -> bytes; ValueError saying what is wrong otherwise."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?i?B?)\s*", str(text), re.IGNORECASE)
        if not isinstance(text, str) or not match or match.group(2).upper() not in _UNITS:
            raise ValueError(f"{text!r} is not a memory size (e.g. 11GiB, 512MiB, 24GB)")
        value, unit = float(match.group(1)), match.group(2).upper()
    if value <= 0:
        raise ValueError(f"memory size must be positive, got {text!r}")
    return int(value * _UNITS[unit])


def parse_bytes(text: str | int, label: str) -> int:
    """:func:`bytes_from`, with a UsageError naming ``label`` (a flag, a key) for bad input."""
    try:
        return bytes_from(text)
    except ValueError as error:
        raise UsageError(f"{label}: {error}") from None


def byte_unit(n: float) -> tuple[str, int]:
    """The largest binary unit that ``n`` bytes is at least one of."""
    return next(((unit, size) for unit, size in BINARY_UNITS if abs(n) >= size), BINARY_UNITS[-1])


def format_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    unit, size = byte_unit(n)
    return f"{n / size:.2f} {unit}" if size > 1 else f"{int(n)} B"
