"""Running a worker script of the tests under torchrun (CPU, gloo): the one launch the parallel tests share."""

import os
import shutil
import subprocess

import pytest


def torchrun(worker: str, *args: object, processes: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node PROCESSES WORKER ARGS...` with one thread a process; fails the
    test with the workers' output when any of them fails, skips it when torchrun is not installed."""
    launcher = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    done = subprocess.run([launcher, "--standalone", "--nproc_per_node", str(processes), worker, *map(str, args)],
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}, capture_output=True, text=True,
                          timeout=300, check=False)  # a failure is reported below with the workers' output
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done
