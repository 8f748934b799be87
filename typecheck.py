"""Plain values read from JSON or TOML checked against a dataclass field's annotation (`int`, `float`,
`str`, `bool`, optionally `| None`): recipes and ArchSpec files hold whatever a user typed."""

from __future__ import annotations

from typing import Any

_PLAIN = {"float": (int, float), "int": (int,), "str": (str,), "bool": (bool,)}


def is_plain(annotation: str) -> bool:
    """Whether the annotation names only plain types (and None), so that `accepts` can judge it."""
    return all(part.strip() in _PLAIN or part.strip() == "None" for part in str(annotation).split("|"))


def accepts(value: Any, annotation: str) -> bool:
    """Whether `value` may stand for a field annotated `annotation` (a bool is not an int here)."""
    annotation = str(annotation)
    allowed = tuple(t for name, ts in _PLAIN.items() if name in annotation for t in ts)
    if value is None:
        return "None" in annotation
    if isinstance(value, bool) and "bool" not in annotation:
        return False
    return isinstance(value, allowed)
