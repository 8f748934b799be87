"""The distillation trainer: it learns, and an interrupted run resumes to the same weights."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.distill.trainer import DistillConfig, distill
from shrink.compress.importance import score
from shrink.compress.prune import prune_ffn
from shrink.errors import ShrinkError
from shrink.families import spec_from_model
from shrink.model import LoadedModel
from tiny_models import tiny_configs

DATA = torch.randint(0, 101, (16, 24), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:  # teacher caches of this module stay in a temporary dir
        patch.setenv("SHRINK_CACHE", str(tmp_path_factory.mktemp("cache")))
        yield _setup()


def _setup():
    torch.manual_seed(0)
    teacher_model = AutoModelForCausalLM.from_config(tiny_configs()["qwen2"]).eval()  # tied embeddings
    teacher = LoadedModel(teacher_model, None, spec_from_model(teacher_model), "tiny-teacher")
    student = prune_ffn(teacher, score(teacher, DATA[:4]), 16)
    train, evaluation = DATA[:12], DATA[12:]
    return teacher, student, train, evaluation, teacher_topk(teacher_model, train, k=16), teacher_topk(teacher_model, evaluation, k=16)


@pytest.mark.parametrize("loss", ["forward_kl", "reverse_kl", "jsd", "skew_kl", "taid"])
def test_distillation_brings_the_student_closer_to_the_teacher(setup, tmp_path, loss):
    teacher, student, train, evaluation, train_topk, eval_topk = setup
    model = copy.deepcopy(student.model)
    config = DistillConfig(loss=loss, lr=3e-3, steps=30, batch_size=4, checkpoint_every=10)
    report = distill(model, train, train_topk, config, tmp_path, evaluation, eval_topk)
    assert report.eval_kl_after < report.eval_kl_before
    assert sum(report.losses[-5:]) < sum(report.losses[:5])
    assert report.tokens == 30 * 4 * 24


def test_teacher_cache_is_reused(setup):
    teacher, _, train, _, train_topk, _ = setup
    again = teacher_topk(teacher.model, train, k=16)
    assert torch.equal(again[0], train_topk[0]) and torch.equal(again[1], train_topk[1])
    assert train_topk[0].dtype == torch.float16 and train_topk[1].shape == (12, 24, 16)


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
