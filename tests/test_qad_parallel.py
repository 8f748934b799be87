"""`shrink quantize --qad` under torchrun (CPU, gloo, 2 processes, FSDP2): the same student as one process.

The tiny Llama is untied, so its frozen embedding and head are FSDP units of their own beside the
fake-quantized layers (compress/distill/parallel.vocabulary_units)."""

import json
import os
import shutil
import subprocess

import pytest
from safetensors.torch import load_file


def _quantize(model_dir, text, out, processes, parallel="fsdp"):
    shrink = shutil.which("shrink") or pytest.skip("the shrink command is not installed")
    launch = [shutil.which("torchrun") or pytest.skip("torchrun is not installed"), "--standalone",
              "--nproc_per_node", str(processes), "--no-python"] if processes > 1 else []
    # a learning rate large enough to move the Q4_0 student well away from its PTQ start in 32 steps
    command = [*launch, shrink, "quantize", str(model_dir), "--format", "int4", "--runtime", "gguf", "--calibration",
               "max", "--qad", "--tokens", "2048", "--lr", "1e-4", "--data", str(text), "--seq-len", "16",
               "--parallel", parallel, "-o", str(out), "--json"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(done.stdout), load_file(out / "model.safetensors")


def test_qad_of_two_fsdp_processes_gives_the_single_process_student(tiny_text_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    single, single_weights = _quantize(model_dir, text, tmp_path / "one", 1)
    sharded, sharded_weights = _quantize(model_dir, text, tmp_path / "two", 2)
    assert (sharded["qad"]["parallel"], sharded["qad"]["processes"]) == ("fsdp", 2)
    assert single["kept"] == sharded["kept"] == "qad"  # QAD changed the weights (it lowered the KL)
    assert single["qad"]["after"]["kl"] < single["ptq"]["kl"]
    assert sharded["qad"]["after"]["kl"] == pytest.approx(single["qad"]["after"]["kl"], rel=1e-4)
    assert single_weights.keys() == sharded_weights.keys()
    for name, value in single_weights.items():
        # on-grid weights: a float difference at rounding level may flip one element by a grid step
        off = (value - sharded_weights[name]).abs() > 1e-5
        assert off.float().mean() <= 1e-3, (name, int(off.sum()))
    moved = [name for name, value in single_weights.items() if name.endswith("proj.weight")]
    assert moved  # the fake-quantized layers are among the weights compared
