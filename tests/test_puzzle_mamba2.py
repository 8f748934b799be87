"""Puzzle's Mamba2 mixer variant (tiny random Llama): offered only where a GraniteMoeHybrid can host the
child, learnt by blockwise distillation, chosen by the program only beside parent sub-blocks (checked
against brute force), and assembled into a GraniteMoeHybrid that computes what the scored child computed
and runs in llama.cpp as granitehybrid."""

from __future__ import annotations

import pytest
import torch

from shrink.compress.importance import score
from shrink.compress.puzzle import bld, library, solve
from shrink.compress.puzzle.assemble import assemble
from shrink.compress.puzzle.library import Variant, holds_together
from shrink.errors import ShrinkError
from shrink.export.gguf import export_gguf
from shrink.export.runtimes import LlamaCppRunner, TorchRunner
from shrink.export.verify import compare
from test_gguf_nemotron_h import IDS, TOLERANCE

ATTENTION = [Variant("attention", n) for n in ("parent", "linear", "mamba2")]
FFN = [Variant("ffn", n) for n in ("parent", "ffn50")]


def _ids(n=8, seq=16, seed=1):
    return torch.randint(0, 100, (n, seq), generator=torch.Generator().manual_seed(seed))


def test_mamba2_is_offered_where_granitemoehybrid_can_host_the_child(tiny_model):
    assert Variant("attention", "mamba2") in library.library(tiny_model("llama").spec)[0]
    for family in ("gemma3", "qwen3", "llama-bias"):  # sliding windows / q-k norms / biases: no granite host
        assert all(v.name != "mamba2" for v in library.library(tiny_model(family).spec)[0])
    spec = library.variant_layer(tiny_model("llama").spec.layers[0], Variant("attention", "mamba2")).mixer
    assert (spec.num_heads, spec.inner) == (4, 64)  # a head per attention head, twice the hidden width


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    from tiny_models import peaked

    loaded = tiny_model("llama", num_hidden_layers=3)
    peaked(loaded.model)
    importance = score(loaded, _ids(), batch_size=4)
    lib = [ATTENTION + FFN for _ in loaded.spec.layers]
    out = tmp_path_factory.mktemp("bld-mamba2")
    errors = bld.run(loaded, _ids(), lib, importance, out, bld.BLDConfig(steps=60, lr=3e-3))
    return loaded, importance, lib, out, errors


def test_blockwise_distillation_teaches_the_mamba2_mixer_its_parents_attention(trained):
    import json

    loaded, importance, lib, out, errors = trained
    for i in range(3):
        # it starts as a no-op (normalized MSE 1) and learns: below the no-op, and its loss fell
        assert errors[i]["attention:mamba2"] < 0.8
        losses = json.loads(bld.variant_file(out, i, Variant("attention", "mamba2")).with_suffix(".json").read_text())["losses"]
        assert losses[0] == pytest.approx(1.0, abs=0.05) and sum(losses[-5:]) / 5 < 0.8


def test_program_keeps_a_mamba2_child_holdable_and_matches_brute_force():
    gen = torch.Generator().manual_seed(5)
    table, kl = {}, {}
    for i in range(3):
        for j, v in enumerate(ATTENTION + FFN):
            table[(i, v)] = solve.Cost(*(float(x) for x in (1 + (v.name == "parent")) * (1 + torch.rand(3, generator=gen))))
            # a Mamba2 mixer scores best of the cheap attention variants, so it competes with narrower FFNs
            kl[(i, v)] = 0.0 if v.name == "parent" else float(torch.rand(1, generator=gen)) * (0.2 if v.name == "mamba2" else 1)
    fixed = solve.Cost(1.0, 1.0, 1.0)
    full = fixed
    for i in range(3):
        full = full + table[(i, ATTENTION[0])] + table[(i, FFN[0])]
    hybrid, other = 0, 0
    for share in (0.95, 0.85, 0.75, 0.65, 0.55, 0.45):
        limits = solve.Limits(decode_s=fixed.decode_s + share * (full.decode_s - fixed.decode_s))
        reference = solve.brute_force(kl, table, fixed, limits)
        if reference is None:  # nothing holdable meets it: the program says so too
            with pytest.raises(ShrinkError):
                solve.solve(kl, table, fixed, limits)
            continue
        best = solve.solve(kl, table, fixed, limits)[0]
        assert best.score == pytest.approx(reference.score)
        chosen = [v for subs in best.choice.values() for v in subs.values()]
        assert holds_together(chosen)
        hybrid += any(v.name == "mamba2" for v in chosen)
        other += any(v.name not in ("parent", "mamba2") for v in chosen)
    assert hybrid and other  # both kinds of child were chosen under some budget: the constraint was in play


def test_a_chosen_mamba2_mixer_makes_a_granitemoehybrid_that_runs_in_llama_cpp(trained, tmp_path):
    loaded, importance, lib, out, _ = trained
    choice = {i: {"attention": Variant("attention", "mamba2" if i == 1 else "parent"), "ffn": FFN[0]} for i in range(3)}
    child = assemble(loaded, choice, out, importance)
    assert child.spec.family == "granitemoehybrid"
    assert [type(layer.mixer).__name__ for layer in child.spec.layers] == ["AttentionSpec", "SSMSpec", "AttentionSpec"]
    # the child is what the scores measured: the parent with layer 1's attention replaced by the trained mixer
    mixer = bld.load_variant(loaded, 1, Variant("attention", "mamba2"), out, importance)
    ids = torch.tensor(IDS)
    with torch.no_grad(), bld.swapped(loaded.model.model.layers[1], attention=mixer):
        scored = loaded.model(ids).logits
        assert torch.allclose(child.model(ids).logits, scored, atol=1e-4)
    report = export_gguf(child, tmp_path / "child.gguf", quant="f32")
    assert report.arch == "granitehybrid"
    metrics = compare(TorchRunner(child.model), LlamaCppRunner(tmp_path / "child.gguf", 64), IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < TOLERANCE
    with pytest.raises(Exception, match="GraniteMoeHybrid"):
        assemble(loaded, {**choice, 0: {"attention": Variant("attention", "linear"), "ffn": FFN[0]}}, out, importance)
