"""Where shrink keeps its caches, and atomic writes: an interrupted run never leaves a file or a
directory that looks finished."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from shrink.errors import ShrinkError


def cache_dir(*parts: str) -> Path:
    """$SHRINK_CACHE, else $XDG_CACHE_HOME/shrink, else ~/.cache/shrink; created on demand."""
    root = os.environ.get("SHRINK_CACHE")
    if root is None:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(xdg) / "shrink")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


_FAULT_PASSAGES: dict[str, int] = {}


def fault_point(label: str) -> None:
    """A place where the kill-anywhere harness (benchmarks/kill_resume.py) may stop the process, as a
    power cut or the kernel's out-of-memory killer would. Each passage is named `label#n` (its n-th in
    this process): $SHRINK_FAULT_TRACE names a file every passage is appended to, so the harness can
    list a run's points; $SHRINK_KILL_AT set to one passage makes the process SIGKILL itself there.
    With neither set (every normal run) this returns at once."""
    trace, kill = os.environ.get("SHRINK_FAULT_TRACE"), os.environ.get("SHRINK_KILL_AT")
    if not trace and not kill:
        return
    _FAULT_PASSAGES[label] = _FAULT_PASSAGES.get(label, 0) + 1
    passage = f"{label}#{_FAULT_PASSAGES[label]}"
    if trace:
        with open(trace, "a") as handle:
            handle.write(passage + "\n")
    if kill == passage:
        os.kill(os.getpid(), signal.SIGKILL)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling file name for a writer that wants a path; renamed on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private; results are meant to be shared
        fault_point(f"write:{path.name}")  # written in full, not yet in place
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


@contextlib.contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path` in one rename.

    An existing `path` is moved aside first and removed only after the new one is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    tmp.chmod(0o755)  # mkdtemp makes it private; a saved model should be readable like any directory
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fault_point(f"directory:{path.name}")  # written in full, not yet in place
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(path, old)
        fault_point(f"replacing:{path.name}")  # the old one moved aside, the new one not yet in place
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


LOCK_FILE = ".shrink.lock"


@contextlib.contextmanager
def directory_lock(directory: str | Path, holder: str = "run") -> Iterator[Path]:
    """Hold `directory` for this process: a second holder is refused with the first one's process id;
    a lock left by a process that no longer runs (a killed run) is taken over."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    while True:
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            other = _lock_holder(lock)
            if other is not None and _alive(other, me["host"]):
                raise ShrinkError(f"'{directory}' is in use by another {holder} (process {other['pid']} on "
                                  f"{other['host']}); wait for it, or choose another --output.") from None
            lock.unlink(missing_ok=True)  # stale or half-written: its process is gone
    with os.fdopen(fd, "w") as handle:
        handle.write(json.dumps(me))
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)


def remove_leftovers(directory: str | Path) -> list[Path]:
    """Delete what killed atomic writes left under `directory` (.NAME.*.tmp files and directories,
    .NAME.old directories): never trusted, since they are not the names readers open, but litter.
    Only for a directory this process holds (directory_lock): nobody else can be writing there."""
    removed = []
    for path in sorted(Path(directory).rglob(".*"), key=lambda p: len(p.parts), reverse=True):
        if path.name.endswith((".tmp", ".old")) and path.exists():
            shutil.rmtree(path) if path.is_dir() else path.unlink()
            removed.append(path)
    return removed


def _lock_holder(lock: Path) -> dict | None:
    try:
        data = json.loads(lock.read_text())
        return data if isinstance(data.get("pid"), int) and isinstance(data.get("host"), str) else None
    except (OSError, ValueError, AttributeError):
        return None


def _alive(holder: dict, host: str) -> bool:
    """Whether the lock's process still runs; one on another host cannot be checked and counts as alive."""
    if holder["host"] != host:
        return True
    try:
        os.kill(holder["pid"], 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        return True
    return True
