"""The flows' Hooks rendered with rich: status lines on a spinner, a distillation as a progress bar."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from shrink.cli.render import Spinner, err_console
from shrink.flows.steps import Hooks
from shrink.progress import ProgressLines


def cli_hooks(spinner: Spinner, **more: Any) -> Hooks:
    """Hooks whose status goes to `spinner` and whose training shows a progress bar (loss, tokens/s,
    ETA); `more` adds the run's step boundaries."""
    return Hooks(status=spinner.update, training=lambda label, total, visible=True: _bar(spinner, label, total, visible),
                 **more)


@contextlib.contextmanager
def _bar(spinner: Spinner, label: str, total: int, visible: bool) -> Iterator[Any]:
    if not err_console.is_terminal:  # a CI log: lines with the rate and the time left (shrink.progress)
        with ProgressLines(label, total, "step", enabled=visible) as lines:
            yield lambda step, value, speed: lines.update(step, f"loss {value:.4f}, {speed:,.0f} tok/s")
        return
    spinner.stop()  # rich allows one live display at a time
    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:,.0f} tok/s"),
                  TimeRemainingColumn(), console=err_console, transient=True, disable=not visible) as bar:
        task = bar.add_task(label, total=total, loss=float("nan"), speed=0.0)
        yield lambda step, value, speed: bar.update(task, completed=step, loss=value, speed=speed)


def saved_by_main(current: Any, save: Callable[[], None]) -> bool:
    """Under torchrun rank 0 alone writes the result; every process then waits for it and leaves the process
    group. True on the process that goes on to report (rank 0, or the only one)."""
    if current.is_main:
        save()
    current.finish()
    return current.is_main
