"""The distillation run behind `shrink distill` and `shrink quantize --qad`: one progress bar, one trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from shrink.cli.render import err_console


def run_distillation(student: Any, split: Any, train_topk: Any, eval_topk: Any, config: Any, checkpoints: Path,
                     teacher: Any = None, current: Any = None, label: str = "distilling") -> Any:
    """Train `student` (a torch module) with the shared trainer under a rich progress bar (loss,
    tokens/s, ETA); returns the trainer's report."""
    from shrink.compress.distill.parallel import world
    from shrink.compress.distill.trainer import distill

    current = current or world()
    with Progress(TextColumn(label), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[speed]:,.0f} tok/s"),
                  TimeRemainingColumn(), console=err_console, transient=True, disable=not current.is_main) as bar:
        task = bar.add_task(label, total=config.steps, loss=float("nan"), speed=0.0)
        return distill(student, split.train, train_topk, config, checkpoints, split.evaluation, eval_topk,
                       teacher=teacher, current=current,
                       progress=lambda step, value, speed: bar.update(task, completed=step, loss=value, speed=speed))


def spinner_paused(spinner: Any, train: Any) -> Any:
    """`train` with the spinner stopped first, so that its progress bar can take the screen."""

    def paused(*args: Any, **kwargs: Any) -> Any:
        spinner.stop()
        return train(*args, **kwargs)

    return paused
