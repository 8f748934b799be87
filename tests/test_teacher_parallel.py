"""The teacher's top-k pass split across processes under torchrun (CPU, gloo): the same cache as one process."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = str(Path(__file__).parent / "teacher_worker.py")


def test_two_processes_write_the_cache_one_process_writes(tmp_path, monkeypatch):
    import teacher_worker
    from safetensors.torch import load_file

    from shrink.compress.distill.teacher import teacher_topk

    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    env = {**os.environ, "SHRINK_CACHE": str(tmp_path / "two"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", WORKER, str(tmp_path / "two.pt")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    ran = [int((tmp_path / f"two.pt.rank{rank}").read_text()) for rank in (0, 1)]
    assert ran == [3, 2]  # 5 batches of 4 sequences: each process ran its share, not the whole pass

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "one"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process computes
    try:
        values, indices = teacher_topk(teacher_worker.teacher(), teacher_worker.DATA, k=16)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(two["indices"], indices) and torch.equal(two["values"], values)
    written = {p.name: load_file(str(p)) for p in (tmp_path / "two" / "teacher").glob("*.safetensors")}
    alone = {p.name: load_file(str(p)) for p in (tmp_path / "one" / "teacher").glob("*.safetensors")}
    assert written.keys() == alone.keys() and len(written) == 1  # one cache, under the same key, written once
    name = next(iter(alone))
    assert all(torch.equal(written[name][key], alone[name][key]) for key in ("values", "indices"))
    assert values.shape == (18, 24, 16)
