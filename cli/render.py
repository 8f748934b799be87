"""Shared rendering: one console for people (stderr for messages), JSON for machines (units: shrink/units.py)."""

from __future__ import annotations

import functools
import json
import os
import sys
from typing import Any

import typer
from rich.console import Console

from shrink.errors import ShrinkError


def _width() -> int | None:
    # Piped output (CI logs, README pastes) gets 120 columns instead of rich's 80, which would
    # fold the operator tables; a terminal keeps its own width.
    return None if sys.stdout.isatty() else int(os.environ.get("COLUMNS", 120))


console = Console(width=_width())
err_console = Console(stderr=True, width=_width())


def print_json(data: Any) -> None:
    """Plain JSON on stdout, nothing else, so `| jq` always works."""
    sys.stdout.write(json.dumps(data, indent=2, default=_jsonable) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and value == float("inf"):
        return None
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return str(value)


def handle_user_errors(fn):
    """Turn a ShrinkError into one red sentence on stderr and exit code 2 (no traceback)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ShrinkError as err:
            err_console.print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


class Spinner:
    """A status line started on the first message and stopped before a progress bar takes over
    (rich allows one live display at a time)."""

    def __init__(self) -> None:
        self._status: Any = None

    def update(self, message: str) -> None:
        if not err_console.is_terminal:  # a CI log gets each stage as a line instead of a spinner
            if message != getattr(self, "_last", None):
                err_console.print(message, highlight=False, markup=False)
            self._last = message
            return
        if self._status is None:
            self._status = err_console.status(message)
            self._status.start()
        else:
            self._status.update(message)

    def stop(self) -> None:
        if self._status is not None:
            self._status.stop()
            self._status = None

    def __enter__(self) -> "Spinner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()
