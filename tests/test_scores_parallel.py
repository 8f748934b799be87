"""Importance, the depth KL and Puzzle's replace-one-block scores split across processes under torchrun
(CPU, gloo, 2 processes): each process runs its share, and the scores are the single-process ones."""

import json
from pathlib import Path

import pytest
import torch
from torchrun_worker import torchrun

WORKER = str(Path(__file__).parent / "scores_worker.py")


def test_two_processes_score_what_one_process_scores(tmp_path, monkeypatch):
    import scores_worker

    from shrink.compress.distill.parallel import World

    torchrun(WORKER, tmp_path / "two.pt", env={"SHRINK_CACHE": str(tmp_path / "two")})
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    ran = [json.loads((tmp_path / f"two.pt.rank{rank}").read_text()) for rank in (0, 1)]

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "one"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process computes
    try:
        one, alone = scores_worker.passes(World())
    finally:
        torch.set_num_threads(threads)
    # 3 calibration batches, 6 layers (plus one reference pass of 3 batches each), 10 replacements x 2 batches
    assert alone == {"importance": 3, "layer_kl": 3 + 6 * 3, "replacements": 20}
    assert [r["importance"] for r in ran] == [2, 1]
    assert [r["layer_kl"] for r in ran] == [3 + 3 * 3, 3 + 3 * 3]
    assert [r["replacements"] for r in ran] == [10, 10]
    assert two["tokens"] == one["tokens"] == scores_worker.DATA.numel()
    for name in ("ffn", "heads"):
        for a, b in zip(two[name], one[name]):
            assert (a is None) == (b is None) and (a is None or torch.allclose(a, b, rtol=1e-6)), name
    for name in ("hidden", "layers", "layer_kl"):
        assert torch.allclose(two[name], one[name], rtol=1e-6), name
    assert two["replace_one_block"].keys() == one["replace_one_block"].keys()
    for key, value in one["replace_one_block"].items():
        assert two["replace_one_block"][key] == pytest.approx(value, rel=1e-6, abs=1e-12), key
    assert one["replace_one_block"]["0|ffn:none"] > 0  # the scores are not all zero
