"""FSDP2 under torchrun (CPU, gloo, 2 processes): the sharded student is the single-process student, and
a sharded checkpoint resumes on another number of processes (2 -> 1, 1 -> 2) to the same weights."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shrink.compress.distill.trainer import distill

WORKER = str(Path(__file__).parent / "distill_worker.py")


def _run(tmp_path, processes, steps, stop_after=None, parallel="fsdp", family="qwen2", structure_only=False):
    env = {**os.environ, "SHRINK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1", "SHRINK_TEST_FAMILY": family,
           "SHRINK_TEST_STRUCTURE_ONLY": "1" if structure_only else "0"}
    if processes > 1:
        torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
        command = [torchrun, "--standalone", "--nproc_per_node", str(processes), WORKER]
    else:
        command = [sys.executable, WORKER]
    args = [str(tmp_path / "run"), str(steps), parallel] + ([str(stop_after)] if stop_after else [])
    done = subprocess.run(command + args, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    # auto with a process holding only the structure must shard: nothing else can train it
    expected = "fsdp" if structure_only else parallel
    assert (report["parallel"], report["processes"]) == ((expected, processes) if processes > 1 else ("none", 1))
    return torch.load(tmp_path / "run" / "final.pt", weights_only=True), report


def _single(tmp_path, steps, family="qwen2", monkeypatch=None):
    import distill_worker

    if monkeypatch is not None:
        monkeypatch.setenv("SHRINK_TEST_FAMILY", family)
    _, student, train, topk = distill_worker.setup()
    distill(student.model, train, topk, distill_worker.config(steps), tmp_path / "single")
    return student.model.state_dict()


def _same(a, b):
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.allclose(value, b[name], atol=1e-5), name


@pytest.mark.parametrize("family", ["qwen2", "llama"])  # tied head in the root unit; untied: embedding and head units
def test_fsdp_two_processes_give_the_single_process_student(tmp_path, monkeypatch, family):
    _same(_run(tmp_path, 2, 4, family=family)[0], _single(tmp_path, 4, family, monkeypatch))


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # untied; tied embedding and head
def test_processes_holding_only_the_structure_train_from_rank_0s_weights(tmp_path, monkeypatch, family):
    # rank 1's student is on the meta device (as `shrink distill` loads it there): its shards and buffers
    # come from rank 0, the result is the single-process student, and rank 1 keeps no whole copy (asserted
    # in the worker)
    weights, _ = _run(tmp_path, 2, 4, parallel="auto", family=family, structure_only=True)
    _same(weights, _single(tmp_path, 4, family, monkeypatch))


def test_a_structure_only_load_has_the_loaded_models_shapes(tiny_text_model_dir, tmp_path):
    from shrink.compress.importance import score
    from shrink.compress.prune import prune_ffn
    from shrink.model import load, save_loaded

    model_dir, _ = tiny_text_model_dir
    full = load(str(model_dir))
    widths = [layer.ffn.width // (2 if i == 0 else 1) for i, layer in enumerate(full.spec.layers)]
    narrowed = prune_ffn(full, score(full, torch.randint(0, 50, (2, 8))), widths)  # per-layer widths: layershapes
    save_loaded(narrowed, tmp_path / "narrowed")
    for source in (str(model_dir), str(tmp_path / "narrowed")):
        loaded, empty = load(source), load(source, weights=False)
        assert all(p.is_meta for p in empty.model.parameters())
        assert empty.spec == loaded.spec
        assert {k: v.shape for k, v in empty.model.state_dict().items()} == \
            {k: v.shape for k, v in loaded.model.state_dict().items()}


def test_an_untied_embedding_and_head_are_units_of_their_own():
    from transformers import AutoModelForCausalLM

    from shrink.compress.distill.parallel import vocabulary_units
    from tiny_models import tiny_configs

    untied = AutoModelForCausalLM.from_config(tiny_configs()["llama"])
    assert vocabulary_units(untied) == [untied.model.embed_tokens, untied.lm_head]
    assert vocabulary_units(AutoModelForCausalLM.from_config(tiny_configs()["qwen2"])) == []


@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_a_sharded_checkpoint_resumes_on_another_number_of_processes(tmp_path, first, then):
    _run(tmp_path, first, 5, stop_after=2)  # a checkpoint after each step; this run ends after step 2
    assert (tmp_path / "run" / "checkpoint" / "state").is_dir()
    weights, report = _run(tmp_path, then, 5)
    assert report["resumed_from"] == 2
    _same(weights, _single(tmp_path, 5))


def test_processes_under_torchrun_map_smaller_allocations(monkeypatch):
    from shrink import allocator

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert allocator.threshold() == allocator.SHARDED < allocator.ALONE
    monkeypatch.delenv("WORLD_SIZE")
    assert allocator.threshold() == allocator.ALONE
