"""Run directories are held by one process at a time; a lock left by a killed run is taken over."""

import json
import os
import socket
import subprocess
import sys

import pytest

from shrink.errors import ShrinkError
from shrink.flows.recipe import VerifyStep
from shrink.storage import LOCK_FILE, directory_lock


def _hold(directory, pid):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LOCK_FILE).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))


def test_a_directory_held_by_a_running_process_is_refused_with_its_pid(tmp_path):
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold(tmp_path / "run", other.pid)
        with pytest.raises(ShrinkError, match=f"in use by another run \\(process {other.pid} "):
            with directory_lock(tmp_path / "run"):
                pass
    finally:
        other.kill()
        other.wait()
    # the holder is gone (killed): its lock is stale and taken over, then released
    with directory_lock(tmp_path / "run") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_half_written_lock_is_taken_over_and_a_lock_is_released_on_error(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK_FILE).write_text('{"pid": ')  # killed while writing it
    with pytest.raises(RuntimeError):
        with directory_lock(tmp_path / "run"):
            raise RuntimeError("a step failed")
    assert not (tmp_path / "run" / LOCK_FILE).exists()


def test_a_recipe_run_holds_its_directory(tmp_path, monkeypatch):
    import shrink.flows.run as flow_run

    seen = {}

    def probe(state, config, out):
        seen.update(json.loads((state.run_dir / LOCK_FILE).read_text()))
        return {"outputs": {}, "metrics": {}}

    monkeypatch.setitem(flow_run.EXECUTORS, "verify", probe)
    flow_run.run_recipe("some-model", [("verify", VerifyStep())], tmp_path / "run")
    assert seen["pid"] == os.getpid() and not (tmp_path / "run" / LOCK_FILE).exists()
    _hold(tmp_path / "run", os.getppid())  # a live process holds it: even --resume is refused
    with pytest.raises(ShrinkError, match="in use by another run"):
        flow_run.run_recipe("some-model", [("verify", VerifyStep())], tmp_path / "run", resume=True)
