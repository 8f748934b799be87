"""Puzzle's blockwise distillation under torchrun (CPU, gloo, 2 processes): with fsdp every variant is
trained by both processes, sharded, each on half of every step's sequences, and comes out as the
single-process variant; with ddp each process trains a disjoint share."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torchrun_worker import torchrun

WORKER = str(Path(__file__).parent / "bld_worker.py")


def _torchrun(out, family, parallel, sequences=4):
    torchrun(WORKER, out, family, parallel, sequences)


# gemma3: sliding-window masks and two rotary sets in the kwargs; one sequence: the second process has none
# in any step and runs one at weight 0
@pytest.mark.parametrize("family,sequences", [("llama", 4), ("gemma3", 4), ("llama", 1)])
def test_sharded_blockwise_distillation_gives_the_single_process_variants(tmp_path, family, sequences):
    import bld_worker

    from shrink.compress.distill.parallel import World

    _torchrun(tmp_path / "two", family, "fsdp", sequences)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        bld_worker.train(tmp_path / "one", family, "fsdp", World(), sequences)  # one process: nothing to shard
    finally:
        torch.set_num_threads(threads)
    files = sorted(p.name for p in (tmp_path / "one").glob("*.safetensors"))
    assert len(files) == 2 * 4 and files == sorted(p.name for p in (tmp_path / "two").glob("*.safetensors"))
    for name in files:
        one, two = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert one.keys() == two.keys()
        for key in one:
            assert torch.allclose(one[key], two[key], atol=1e-5), (name, key)
        losses = [json.loads((tmp_path / d / name).with_suffix(".json").read_text())["losses"] for d in ("one", "two")]
        assert losses[1] == pytest.approx(losses[0], rel=1e-4)
        assert losses[0][-1] < losses[0][0]  # the variant trained


def test_disjoint_shares_train_every_variant_once(tmp_path):
    _torchrun(tmp_path / "two", "llama", "ddp")
    assert len(list((tmp_path / "two").glob("*.safetensors"))) == 2 * 4
