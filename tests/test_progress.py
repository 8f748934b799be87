"""Progress lines in a CI log (shrink/progress.py): the rule (first unit, last unit, at least every
LOG_EVERY_S seconds, a timer thread while one unit outlasts it, silent on a terminal) and every long
step emitting them on a tiny model."""

import io
import logging
import os
import time

import pytest
import torch

from shrink import progress
from shrink.progress import ProgressLines, duration


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(caplog, label):
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith(label + ":")]


@pytest.fixture
def ci_log(monkeypatch, caplog):
    """stderr not a terminal, a line after every unit (no 30 s waits), the shrink logger captured."""
    monkeypatch.setattr("sys.stderr", open(os.devnull, "w"))
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="shrink")
    return caplog


def test_lines_come_first_last_and_at_least_every_interval(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", open(os.devnull, "w"))
    clock = iter([0.0, 2.0, 10.0, 33.0, 50.0, 70.0, 80.0])  # started, then one reading per unit
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="shrink")
    with ProgressLines("scoring", 6, "batch") as lines:
        for _ in range(6):
            lines.advance(detail="x")
    got = _lines(caplog, "scoring")
    # unit 1 (first), unit 3 at 33 s (31 s after the line at 2 s), unit 5 at 70 s (37 s after), unit 6 (last)
    assert [line.split(",")[0] for line in got] == ["scoring: batch 1/6", "scoring: batch 3/6", "scoring: batch 5/6",
                                                    "scoring: batch 6/6"]
    assert got[1] == "scoring: batch 3/6, 0.0909 batches/s, x, about 33 s left (estimated)"


def test_a_terminal_gets_no_lines(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", _Terminal())
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    caplog.set_level(logging.INFO, logger="shrink")
    with ProgressLines("scoring", 3) as lines:
        for _ in range(3):
            lines.advance()
    assert not lines.enabled and not _lines(caplog, "scoring")


def test_a_resumed_count_measures_the_rate_of_this_process(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", open(os.devnull, "w"))
    clock = iter([0.0, 10.0, 20.0])
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    caplog.set_level(logging.INFO, logger="shrink")
    with ProgressLines("distilling", 100) as lines:
        lines.update(51)  # resumed at step 50: one step in 10 s here, not 51
        lines.update(52)
    first = _lines(caplog, "distilling")[0]
    assert first.startswith("distilling: step 51/100, 0.1 steps/s") and "about 8 min 10 s left" in first


def test_the_timer_speaks_while_one_unit_outlasts_the_interval(monkeypatch, caplog):
    monkeypatch.setattr("sys.stderr", open(os.devnull, "w"))
    monkeypatch.setattr(progress, "LOG_EVERY_S", 1.0)  # the shortest interval that runs the timer thread
    caplog.set_level(logging.INFO, logger="shrink")
    with ProgressLines("exporting", 1, "artifact") as lines:
        time.sleep(2.5)  # one unit of 2.5 s: the timer's lines at about 1 s and 2 s
        lines.advance()
    got = _lines(caplog, "exporting")
    assert len(got) >= 2 and "the first still running after 1 s" in got[0]
    assert got[-1].startswith("exporting: artifact 1/1") and not lines._thread.is_alive()


def test_durations_read_at_a_glance():
    assert [duration(s) for s in (4.4, 245, 7380, -3)] == ["4 s", "4 min 05 s", "2 h 03 min", "0 s"]


# --- every long step emits them (tiny random models) ---

def test_importance_and_layer_kl_scoring(tiny_model, ci_log):
    from shrink.compress.importance import layer_kl_scores, score

    loaded = tiny_model("llama", num_hidden_layers=2)
    batches = torch.randint(0, 101, (6, 16), generator=torch.Generator().manual_seed(0))
    score(loaded, batches, batch_size=4)
    layer_kl_scores(loaded, batches, batch_size=4)
    assert _lines(ci_log, "importance scoring")[-1].startswith("importance scoring: batch 2/2")
    assert [line.split(",")[0] for line in _lines(ci_log, "layer KL scoring")] == [
        "layer KL scoring: pass 1/3", "layer KL scoring: pass 2/3", "layer KL scoring: pass 3/3"]


def test_teacher_topk_awq_mse_and_qad(tiny_model, ci_log, monkeypatch, tmp_path):
    from shrink.compress.data import split
    from shrink.compress.distill.teacher import teacher_topk
    from shrink.compress.distill.trainer import DistillConfig
    from shrink.compress.quant.plan import make_plan
    from shrink.compress.quant.ptq import awq, clip_to_mse
    from shrink.compress.quant.run import plain_train

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    wide = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "head_dim": 16,
            "num_attention_heads": 4, "num_key_value_heads": 4}
    loaded = tiny_model("llama", **wide)
    data = split(torch.randint(0, 101, (12, 32), generator=torch.Generator().manual_seed(1)))
    topk = teacher_topk(loaded.model, data.train, k=8)
    eval_topk = teacher_topk(loaded.model, data.evaluation, k=8)
    plan = make_plan(loaded.model, "int4", "gguf")
    awq(loaded.model, plan, data.calibration, "llama")
    clip_to_mse(loaded.model, plan)
    plain_train(loaded.model, data, topk, eval_topk, DistillConfig(steps=3, batch_size=2, top_k=8), tmp_path / "ck")
    assert "teacher top-k logits: batch 2/2" in [line.split(",")[0] for line in _lines(ci_log, "teacher top-k logits")]
    for label, last in (("teacher top-k logits", "batch 1/1"), ("AWQ activations", "batch 1/1"),
                        ("AWQ search", f"group {len(_lines(ci_log, 'AWQ search'))}/"), ("MSE clipping", "tensor 7/7"),
                        ("QAD", "step 3/3")):
        got = _lines(ci_log, label)
        assert got and got[-1].startswith(f"{label}: {last}") and "left (estimated)" in got[-1], (label, got)
    assert "loss " in _lines(ci_log, "QAD")[-1] and "tok/s" in _lines(ci_log, "QAD")[-1]


def test_export_and_verify(tiny_model, ci_log, tmp_path):
    from shrink.export.workflow import export_artifact

    result = export_artifact(tiny_model("llama"), "gguf", tmp_path / "m.gguf", quant="f32")
    assert result.verdict.metrics.positions > 0
    assert _lines(ci_log, "gguf export")[-1].startswith("gguf export: artifact 1/1")
    verify = _lines(ci_log, "verify")
    assert verify and verify[-1].startswith("verify: sequence ") and "left (estimated)" in verify[-1]
