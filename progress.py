"""Progress as log lines where no live display reaches: stderr not a terminal, as in a CI job's log.

Every long step (teacher corpus, importance, teacher top-k, distillation and QAD, AWQ, export,
verify) counts its units of work through one `ProgressLines`; where stderr is a terminal it stays
silent (the command's live bar or spinner shows instead). A line gives the count, the rate measured
in this process and the time left (estimated), after the first unit, after the last, and at least
every LOG_EVERY_S seconds between them: a timer thread speaks up when a single unit (one
distillation step of a large model) outlasts the interval.

    with ProgressLines("importance scoring", batches, "batch") as lines:
        for batch in ...:
            ...
            lines.advance()
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from typing import Any

LOG_EVERY_S = 30.0  # the longest a CI log goes without a line while a step works
HEARTBEAT_MIN_S = 1.0  # an interval under this (tests) logs after each unit, with no timer thread

log = logging.getLogger("shrink")


def to_log() -> bool:
    """Whether progress should be written as lines: stderr is not a terminal (a CI log, a pipe, a file)."""
    return not sys.stderr.isatty()


def duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 2 h 03 min: a time left readable at a glance."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"
    return f"{int(seconds // 3600)} h {int(seconds % 3600 // 60):02d} min"


def _plural(unit: str) -> str:
    return unit + ("es" if unit.endswith(("s", "x", "ch", "sh")) else "s")


class ProgressLines:
    """Lines `label: unit done/total, rate units/s[, detail], about T left (estimated)` for `total`
    units of work; inert unless `enabled` (default: stderr is not a terminal)."""

    def __init__(self, label: str, total: int, unit: str = "step", enabled: bool | None = None) -> None:
        self.label, self.total, self.unit = label, max(0, int(total)), unit
        self.enabled = to_log() if enabled is None else enabled
        self.done = 0  # units done in all (a resumed run starts past 0)
        self.here = 0  # units done by this process: the rate's numerator
        self.detail = ""
        self.started = self.last = time.perf_counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> ProgressLines:
        if self.enabled and LOG_EVERY_S >= HEARTBEAT_MIN_S:
            self._thread = threading.Thread(target=self._heartbeat, name=f"progress: {self.label}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def advance(self, n: int = 1, detail: str = "") -> None:
        """`n` more units done; `detail` (say the loss) is shown on the lines from now on."""
        with self._lock:
            self.done += n
            self.here += n
            self.detail = detail or self.detail
            if not self.enabled:
                return
            now = time.perf_counter()
            if self.here == n or self.done >= self.total or now - self.last >= LOG_EVERY_S:
                self._line(now)

    def update(self, done: int, detail: str = "") -> None:
        """The count is now `done`. The first call counts as one unit done in this process, so a run
        resumed at step 50 does not claim fifty steps in its first second."""
        if self.here == 0:
            self.done = done - 1
        self.advance(done - self.done, detail)

    def _heartbeat(self) -> None:
        while not self._stop.wait(LOG_EVERY_S):
            with self._lock:
                now = time.perf_counter()
                if now - self.last >= LOG_EVERY_S:
                    self._line(now)

    def _line(self, now: float) -> None:
        self.last = now
        elapsed = now - self.started
        text = f"{self.label}: {self.unit} {self.done}/{self.total}"
        if self.here and elapsed > 0:
            rate = self.here / elapsed
            text += f", {rate:.3g} {_plural(self.unit)}/s" + (f", {self.detail}" if self.detail else "")
            text += f", about {duration((self.total - self.done) / rate)} left (estimated)"
        else:
            text += f", the first still running after {duration(elapsed)}"
        log.info("%s", text)
