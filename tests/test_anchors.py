"""Estimated candidates anchored to files of the same model measured in the same run (flows/anchors.py)."""

from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig

from shrink.families import spec_from_config
from shrink.flows.anchors import Anchor, anchor_candidates, anchor_for
from shrink.flows.candidates import TIME_LINE, Candidate, TargetBudget

SPEC = spec_from_config(LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                    num_attention_heads=4, num_key_value_heads=2))
Q8 = Anchor("Q8_0", "q8_0", "q8_0", measured_s=11e-3, estimated_s=10e-3)  # the machine runs 10% slower than estimated
Q4_VOCAB_Q6 = Anchor("Q4_0", "q4_0", "q6_k", measured_s=9e-3, estimated_s=10e-3)


def test_an_anchor_is_the_file_stored_alike_else_one_with_the_same_vocabulary():
    assert anchor_for([Q8, Q4_VOCAB_Q6], "q8_0", "q8_0") is Q8
    assert anchor_for([Q8, Q4_VOCAB_Q6], "q4_0", "q8_0") is Q8  # the vocabulary dominates a small model's step
    assert anchor_for([Q4_VOCAB_Q6], "q4_0", "q8_0") is None
    assert anchor_for([], "q8_0", "q8_0") is None


def _costed(label_keep: float, fmt: str | None, runtime: str, tpot_s: float, budget: TargetBudget) -> Candidate:
    candidate = Candidate(label_keep, "width" if label_keep < 1 else "-", fmt, runtime, None, tpot_s=tpot_s, costed=True)
    if tpot_s > budget.tpot_s:
        candidate.misses.append(TIME_LINE)
    return candidate


def test_anchored_times_decide_the_budget_line_both_ways():
    budget = TargetBudget(tpot_s=10.5e-3)
    just_fits = _costed(0.6, "int8", "gguf", 10e-3, budget)  # 10 ms estimated, 11 ms once anchored: misses
    onnx = _costed(0.6, "int8", "onnx", 10e-3, budget)  # no ONNX file was measured: left as estimated
    rejected = Candidate(0.8, "depth", "int8", "gguf", None, rejected="llama.cpp cannot run it")  # never costed
    anchor_candidates([just_fits, onnx, rejected], [Q8], SPEC, budget)
    assert just_fits.tpot_s == pytest.approx(11e-3) and just_fits.roofline_tpot_s == pytest.approx(10e-3)
    assert just_fits.misses == [TIME_LINE] and not just_fits.fits
    assert just_fits.to_dict()["anchor"]["ratio"] == pytest.approx(1.1)
    assert onnx.tpot_s == 10e-3 and onnx.anchor is None and onnx.fits
    assert rejected.anchor is None and rejected.to_dict()["tpot_s_estimated"] is None

    faster_now = Anchor("Q8_0", "q8_0", "q8_0", measured_s=9e-3, estimated_s=10e-3)
    missed = _costed(0.6, "int8", "gguf", 11e-3, budget)  # 11 ms estimated, 9.9 ms once anchored: fits
    anchor_candidates([missed], [faster_now], SPEC, budget)
    assert missed.tpot_s == pytest.approx(9.9e-3) and missed.fits


def test_the_quantizer_search_on_a_measured_target_returns_its_files_as_anchors(tiny_model):
    from shrink.compress.data import DataSplit
    from shrink.flows.gguf_quantize import quantizer_candidate
    from shrink.hardware.profiles import get_profile
    from shrink.hardware.roofline import Workload

    loaded = tiny_model("llama", hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
    loaded.source = "tiny"
    ids = torch.randint(1, 101, (6, 32), generator=torch.Generator().manual_seed(0))
    split = DataSplit(ids[:2], ids[2:4], ids[4:], "random ids")
    estimated_only = get_profile("jetson-orin-nano")
    _, _, none = quantizer_candidate(loaded, split, estimated_only, Workload(), TargetBudget(tpot_s=1.0))
    assert none == []  # nothing measured off host: nothing to anchor to
    timed_here = replace(estimated_only, measured=True)  # as host: each file timed in llama.cpp here
    best, _, anchors = quantizer_candidate(loaded, split, timed_here, Workload(), TargetBudget(tpot_s=1.0))
    assert best is not None and best.quantizer["cost"]["by"] == "measured"
    assert anchors and all(a.measured_s > 0 and a.estimated_s > 0 for a in anchors)
    assert any(a.label == best.quantizer["label"] and a.measured_s == best.quantizer["cost"]["tpot_s"] for a in anchors)
    assert {(a.weights, a.vocabulary) for a in anchors} >= {("q8_0", "q8_0")}  # the Q8_0 file type anchors int8
