"""The teacher's top-k pass split across processes under torchrun (CPU, gloo): the same cache as one process."""

from pathlib import Path

import torch
from torchrun_worker import torchrun

WORKER = str(Path(__file__).parent / "teacher_worker.py")


def test_two_processes_write_the_cache_one_process_writes(tmp_path, monkeypatch):
    import teacher_worker
    from safetensors.torch import load_file

    from shrink.compress.distill.teacher import teacher_topk

    torchrun(WORKER, tmp_path / "two.pt", env={"SHRINK_CACHE": str(tmp_path / "two")})
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
