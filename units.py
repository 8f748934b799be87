"""Quantities people type and read: sizes (300MB, 1.5GB), durations (20ms, 1.2s), and their display.

Bottom layer: the planner parses budgets with these and the commands print with them."""

from __future__ import annotations

import re

from shrink.errors import ShrinkError

_SIZES = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30}
_TIMES = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6}
_NUMBER = r"\s*([0-9]*\.?[0-9]+(?:e[-+]?[0-9]+)?)\s*([a-zµ]*)\s*"


def parse_size(text: str, option: str) -> float:
    """Bytes from '300MB', '1.5 GB', '2GiB' or a plain number of bytes."""
    match = re.fullmatch(_NUMBER, text.lower())
    if not match or match.group(2) not in _SIZES:
        raise ShrinkError(f"{option} must be a size such as 300MB or 1.5GB, not '{text}'.")
    return float(match.group(1)) * _SIZES[match.group(2)]


def parse_duration(text: str, option: str) -> float:
    """Seconds from '20ms', '1.5s' or '800us' (a unit is required: '20' is ambiguous)."""
    match = re.fullmatch(_NUMBER, text.lower())
    if not match or match.group(2) not in _TIMES:
        raise ShrinkError(f"{option} must be a duration with a unit such as 20ms or 1.5s, not '{text}'.")
    value = float(match.group(1)) * _TIMES[match.group(2)]
    if value <= 0:
        raise ShrinkError(f"{option} must be positive, not '{text}'.")
    return value


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def fmt_count(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def fmt_rate(per_s: float, unit: str) -> str:
    return f"{per_s:,.1f} {unit}/s" if per_s < 1e4 else f"{per_s:,.0f} {unit}/s"
