"""The distillation trainer: it learns, and an interrupted run resumes to the same weights."""

import copy

import pytest
import torch

from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.distill.trainer import DistillConfig, distill
from shrink.compress.importance import score
from shrink.compress.prune import prune_ffn
from shrink.errors import ShrinkError
from tiny_models import peaked, perturbed

DATA = torch.randint(0, 101, (16, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_model):
    with pytest.MonkeyPatch.context() as patch:  # teacher caches of this module stay in a temporary dir
        patch.setenv("SHRINK_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield _setup(tiny_model)


def _setup(tiny_model):
    teacher = tiny_model("qwen2")  # tied embeddings
    teacher_model = peaked(teacher.model)
    student = prune_ffn(teacher, score(teacher, DATA[:4]), 16)
    perturbed(student.model)  # KL 0.0003 after pruning alone: too close for distillation to show anything
    train, evaluation = DATA[:12], DATA[12:]
    return teacher, student, train, evaluation, teacher_topk(teacher_model, train, k=16), teacher_topk(teacher_model, evaluation, k=16)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "taid"])
def test_distillation_brings_the_student_closer_to_the_teacher(setup, tmp_path, loss):
    teacher, student, train, evaluation, train_topk, eval_topk = setup
    model = copy.deepcopy(student.model)
    config = DistillConfig(loss=loss, lr=1e-3, steps=30, batch_size=4, checkpoint_every=10)
    report = distill(model, train, train_topk, config, tmp_path, evaluation, eval_topk)
    assert report.eval_after["kl"] < report.eval_before["kl"]
    if loss != "taid":  # TAID's target moves towards the teacher as it trains: its losses are not comparable
        assert sum(report.losses[-5:]) < sum(report.losses[:5])
    assert report.tokens == 30 * 4 * 24


def test_teacher_cache_is_reused(setup):
    teacher, _, train, _, train_topk, _ = setup
    again = teacher_topk(teacher.model, train, k=16)
    assert torch.equal(again[0], train_topk[0]) and torch.equal(again[1], train_topk[1])
    assert train_topk[0].dtype == torch.float32 and train_topk[1].shape == (12, 24, 16)


def test_killed_run_resumes_to_identical_weights(setup, tmp_path):
    _, student, train, _, train_topk, _ = setup
    config = DistillConfig(loss="taid", lr=3e-3, steps=12, batch_size=4, checkpoint_every=3)
    whole = copy.deepcopy(student.model)
    distill(whole, train, train_topk, config, tmp_path / "whole")
    interrupted = copy.deepcopy(student.model)
    distill(interrupted, train, train_topk, config, tmp_path / "split", stop_after=7)  # killed after step 7
    resumed = copy.deepcopy(student.model)  # a fresh process starts from the pruned weights again
    report = distill(resumed, train, train_topk, config, tmp_path / "split")
    assert report.resumed_from == 6  # the last checkpoint before the kill
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_resume_with_other_settings_is_refused(setup, tmp_path):
    _, student, train, _, train_topk, _ = setup
    distill(copy.deepcopy(student.model), train, train_topk, DistillConfig(steps=3, checkpoint_every=3), tmp_path)
    with pytest.raises(ShrinkError, match="other settings"):
        distill(copy.deepcopy(student.model), train, train_topk, DistillConfig(steps=4, checkpoint_every=3), tmp_path)


def test_gradient_accumulation_gives_the_same_step(setup, tmp_path):
    _, student, train, _, train_topk, _ = setup
    results = []
    for accum in (1, 2):
        model = copy.deepcopy(student.model)
        distill(model, train, train_topk, DistillConfig(lr=3e-3, steps=4, grad_accum=accum), tmp_path / str(accum))
        results.append(model.state_dict())
    for name, value in results[0].items():
        assert torch.allclose(value, results[1][name], atol=1e-6), name


def test_periodic_evaluation_reports_kl_and_perplexity(setup, tmp_path):
    _, student, train, evaluation, train_topk, eval_topk = setup
    config = DistillConfig(lr=3e-3, steps=6, eval_every=2)
    report = distill(copy.deepcopy(student.model), train, train_topk, config, tmp_path, evaluation, eval_topk)
    assert [e["step"] for e in report.evals] == [2, 4, 6]
    assert all(e["perplexity"] > 1 and e["kl"] >= 0 for e in report.evals)
    assert report.evals[-1] == {"step": 6, **report.eval_after}
    assert report.tokens_per_second > 0


def test_learning_rate_warms_up_then_decays():
    from shrink.compress.distill.trainer import _lr_factor

    factor = _lr_factor(DistillConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1))
    assert factor(0) == pytest.approx(0.1) and factor(9) == pytest.approx(1.0)
    assert factor(10) == pytest.approx(1.0) and factor(55) == pytest.approx(0.55) and factor(100) == pytest.approx(0.1)


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(setup, tmp_path):
    _, student, train, _, train_topk, _ = setup
    model = copy.deepcopy(student.model)
    calls = {"n": 0}

    def poison(_module, _args, output):  # the 4th forward pass gives the head NaN hidden states
        calls["n"] += 1
        if calls["n"] == 4:
            output.last_hidden_state = output.last_hidden_state * float("nan")
        return output

    model.model.register_forward_hook(poison)  # the body: the loss runs the head over slices itself
    with pytest.raises(ShrinkError, match="diverged at step 4.*last good checkpoint"):
        distill(model, train, train_topk, DistillConfig(lr=3e-3, steps=6, checkpoint_every=2), tmp_path)
    import json

    assert json.loads((tmp_path / "checkpoint" / "progress.json").read_text())["step"] == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the bad step never reached the weights


def test_hidden_state_term_trains_with_a_projection(setup, tmp_path):
    teacher, student, train, evaluation, train_topk, eval_topk = setup
    model = copy.deepcopy(student.model)
    config = DistillConfig(lr=3e-3, steps=20, hidden_weight=1.0)
    report = distill(model, train, train_topk, config, tmp_path, evaluation, eval_topk, teacher=teacher.model)
    assert report.eval_after["kl"] < report.eval_before["kl"]
    with pytest.raises(ShrinkError, match="teacher model itself"):
        distill(copy.deepcopy(student.model), train, train_topk, config, tmp_path / "x")


def _worker(tmp_path, *command, steps=6):
    import os
    import subprocess
    from pathlib import Path

    env = {**os.environ, "SHRINK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    worker = str(Path(__file__).parent / "distill_worker.py")
    return subprocess.Popen([*command, worker, str(tmp_path / "run"), str(steps)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _single_process_weights(tmp_path, steps):
    import distill_worker

    _, student, train, topk = distill_worker.setup()
    distill(student.model, train, topk, distill_worker.config(steps), tmp_path / "single")
    return student.model.state_dict()


def test_torchrun_two_processes_match_one(tmp_path):
    import shutil
    import sys

    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    process = _worker(tmp_path, torchrun, "--standalone", "--nproc_per_node", "2")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    parallel = torch.load(tmp_path / "run" / "final.pt", weights_only=True)
    single = _single_process_weights(tmp_path, 6)
    for name, value in single.items():
        assert torch.allclose(value, parallel[name], atol=1e-5), name
    assert sys.modules["distill_worker"].config(6).batch_size % 2 == 0


def test_a_killed_process_resumes_to_the_uninterrupted_weights(tmp_path):
    import json
    import signal
    import sys
    import time

    steps = 40
    process = _worker(tmp_path, sys.executable, steps=steps)
    progress = tmp_path / "run" / "checkpoint" / "progress.json"
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if progress.is_file() and json.loads(progress.read_text())["step"] >= 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    killed_at = json.loads(progress.read_text())["step"]
    assert 3 <= killed_at < steps, "the run finished before it could be killed"
    import distill_worker

    _, student, train, topk = distill_worker.setup()
    report = distill(student.model, train, topk, distill_worker.config(steps), tmp_path / "run")
    assert report.resumed_from >= killed_at
    single = _single_process_weights(tmp_path, steps)
    for name, value in single.items():
        assert torch.equal(value, student.model.state_dict()[name]), name


def test_cli_distills_and_torchrun_gives_the_same_student(tiny_text_model_dir, tmp_path):
    """The user's command, single-process and under torchrun with two processes."""
    import json
    import os
    import shutil
    import subprocess

    from shrink.model import load

    model_dir, text = tiny_text_model_dir
    env = {**os.environ, "SHRINK_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    shrink = shutil.which("shrink") or pytest.skip("the shrink command is not installed")
    student = tmp_path / "pruned"
    # hidden 32 -> 16: a KL of about 1 nat to recover (FFN pruning of a random tiny model costs ~0.003)
    pruned = subprocess.run([shrink, "prune", str(model_dir), "--hidden", "16", "--data", str(text), "--seq-len", "16",
                             "-o", str(student)], env=env, capture_output=True, text=True)
    assert pruned.returncode == 0, pruned.stderr
    common = ["distill", str(student), "--teacher", str(model_dir), "--data", str(text), "--seq-len", "16",
              "--steps", "4", "--lr", "1e-3", "--json"]
    single = subprocess.run([shrink, *common, "-o", str(tmp_path / "one")], env=env, capture_output=True, text=True)
    assert single.returncode == 0, single.stderr
    report = json.loads(single.stdout)
    assert report["processes"] == 1 and report["report"]["tokens"] == 4 * 4 * 16
    assert report["report"]["eval_after"]["kl"] < report["report"]["eval_before"]["kl"]
    assert report["report"]["eval_after"]["perplexity"] > 1
    torchrun = shutil.which("torchrun") or pytest.skip("torchrun is not installed")
    # sharded: rank 1 loads the student's structure only and receives its shards from rank 0
    parallel = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "--no-python", shrink, *common,
                               "--parallel", "fsdp", "-o", str(tmp_path / "two")], env=env, capture_output=True, text=True)
    assert parallel.returncode == 0, parallel.stderr
    assert json.loads(parallel.stdout)["processes"] == 2
    assert json.loads(parallel.stdout)["report"]["parallel"] == "fsdp"
    one, two = load(str(tmp_path / "one")).model.state_dict(), load(str(tmp_path / "two")).model.state_dict()
    start = load(str(student)).model.state_dict()
    assert not torch.equal(one["model.layers.0.mlp.up_proj.weight"], start["model.layers.0.mlp.up_proj.weight"])
    for name, value in one.items():
        assert torch.allclose(value, two[name], atol=1e-5), name


def test_distill_loads_the_teacher_in_8_bit_when_asked(tiny_text_model_dir, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from shrink.cli.app import app
    from shrink.flows import steps

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    loaded_as, real = [], steps.load_bitsandbytes
    monkeypatch.setattr(steps, "load_bitsandbytes", lambda source, mode: loaded_as.append(mode) or real(source, mode))
    model_dir, text = tiny_text_model_dir
    result = CliRunner().invoke(app, ["distill", str(model_dir), "--teacher", str(model_dir), "--teacher-load", "8bit",
                                      "--data", str(text), "--seq-len", "16", "--steps", "2", "--lr", "1e-4",
                                      "-o", str(tmp_path / "d"), "--json"])
    assert result.exit_code == 0, result.output
    assert loaded_as == ["8bit"] and json.loads(result.stdout)["report"]["tokens"] == 2 * 4 * 16
