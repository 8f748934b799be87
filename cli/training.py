"""The flows' Hooks rendered with rich: status lines on a spinner, a distillation as a progress bar."""

from __future__ import annotations

import contextlib
import time
from typing import Any, Iterator

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from shrink.cli.render import Spinner, err_console
from shrink.flows.steps import Hooks


def cli_hooks(spinner: Spinner, **more: Any) -> Hooks:
    """Hooks whose status goes to `spinner` and whose training shows a progress bar (loss, tokens/s,
    ETA); `more` adds the run's step boundaries."""
    return Hooks(status=spinner.update, training=lambda label, total, visible=True: _bar(spinner, label, total, visible),
                 **more)


LOG_EVERY_S = 30.0  # a CI log (stderr not a terminal) gets a progress line at least this often


@contextlib.contextmanager
def _bar(spinner: Spinner, label: str, total: int, visible: bool) -> Iterator[Any]:
    if not err_console.is_terminal:
        yield _log_lines(label, total) if visible else (lambda step, value, speed: None)
        return
    spinner.stop()  # rich allows one live display at a time
    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:,.0f} tok/s"),
                  TimeRemainingColumn(), console=err_console, transient=True, disable=not visible) as bar:
        task = bar.add_task(label, total=total, loss=float("nan"), speed=0.0)
        yield lambda step, value, speed: bar.update(task, completed=step, loss=value, speed=speed)


def _log_lines(label: str, total: int) -> Any:
    """Progress as plain lines (a CI log has no live display): the first step, then one line at least
    every LOG_EVERY_S seconds, and the last step, each with its rate and the time left (estimated)."""
    started = time.perf_counter()
    last = [float("-inf")]

    def report(step: int, loss: float, speed: float) -> None:
        now = time.perf_counter()
        if step not in (1, total) and now - last[0] < LOG_EVERY_S:
            return
        last[0] = now
        left = (now - started) / max(step, 1) * (total - step)
        err_console.print(f"{label}: step {step}/{total}, loss {loss:.4f}, {speed:,.0f} tok/s, "
                          f"about {left:.0f} s left (estimated)", highlight=False, markup=False)

    return report
