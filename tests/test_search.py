"""Choosing prune shapes under a budget: the planned ArchSpec is the one pruning produces, every
candidate meets the budget, and the CLI turns a budget into a saved, smaller model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from shrink.cli.app import app
from shrink.compress.importance import score
from shrink.compress.search import Budget, apply, default_plan, feasible, grid, rank_by_proxy, shortlist
from shrink.errors import ShrinkError
from shrink.hardware.profiles import get_profile

CALIBRATION = torch.randint(0, 101, (6, 24), generator=torch.Generator().manual_seed(1))


def ranking(importance):
    return importance.layers.argsort(descending=True).tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_planned_spec_is_the_pruned_models_spec(tiny_model, family):
    loaded = tiny_model(family)
    importance = score(loaded, CALIBRATION)
    plans = feasible(loaded.spec, ranking(importance), "both", Budget(params=0.5))
    for plan in shortlist(plans, 3):
        pruned = apply(plan, loaded, importance)
        assert sum(p.numel() for p in pruned.model.parameters()) == plan.spec.param_counts().total
        assert pruned.spec.param_counts() == plan.spec.param_counts()


def llama_non_embedding(hidden, heads_per_group, ffn, layers):
    """A second count of a tiny Llama's weights outside its embeddings (2 KV heads of 8, no biases), by
    hand: per layer q and o are hidden x (2 groups x heads_per_group x 8) each, k and v hidden x 16 each,
    gate, up and down hidden x ffn each, and 2 norms of hidden; then a final norm."""
    per_layer = 2 * hidden * 16 * heads_per_group + 2 * hidden * 16 + 3 * hidden * ffn + 2 * hidden
    return layers * per_layer + hidden


def non_embedding(model):
    """The parameters a model holds outside its token embedding and lm_head, counted from its tensors."""
    tables = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in tables)


def test_every_feasible_candidate_meets_a_parameter_budget(tiny_model):
    loaded = tiny_model("llama", num_hidden_layers=4)
    importance = score(loaded, CALIBRATION)
    # 4 layers of 32 x (2 x 16 x 2 + 2 x 16 + 3 x 48 + 2) = 7,744 each, plus the final norm's 32
    assert llama_non_embedding(32, 2, 48, 4) == non_embedding(loaded.model) == 31_008
    limit = 0.6 * 31_008
    for axis in ("width", "depth", "both"):
        plans = feasible(loaded.spec, ranking(importance), axis, Budget(params=0.6))
        sizes = {shape: llama_non_embedding(shape[2], shape[1], shape[0], len(shape[3]))
                 for shape in grid(loaded.spec, ranking(importance), axis)}
        shapes = [(p.ffn, p.heads_per_group, p.hidden, p.kept_layers) for p in plans]
        assert plans and all(sizes[shape] <= limit for shape in shapes)
        assert set(shapes) == {shape for shape, size in sizes.items() if size <= limit}  # none that fits is lost
        assert [p.figures["non_embedding_params"] for p in plans] == [sizes[shape] for shape in shapes]
        assert [sizes[shape] for shape in shapes] == sorted((sizes[shape] for shape in shapes), reverse=True)
        if axis == "depth":
            assert {p.ffn for p in plans} == {48} and all(len(p.kept_layers) < 4 for p in plans)
        if axis == "width":
            assert all(len(p.kept_layers) == 4 for p in plans)
    plans = feasible(loaded.spec, ranking(importance), "both", Budget(params=0.6))
    chosen = default_plan(plans, loaded.spec)
    assert len(chosen.kept_layers) == 4  # width before depth
    # the tiny model's coarse grid has its nearest heads-kept shape 6% under the largest: with that
    # much slack the rule keeps the heads too
    chosen = default_plan(plans, loaded.spec, slack=0.07)
    assert len(chosen.kept_layers) == 4 and chosen.heads_per_group == 2


def test_latency_budget_is_met_by_estimate_and_an_impossible_one_is_refused(tiny_model):
    loaded = tiny_model("llama", num_hidden_layers=4)
    importance = score(loaded, CALIBRATION)
    profile = get_profile("jetson-orin")
    full = feasible(loaded.spec, ranking(importance), "both", Budget(latency_s=1.0, profile=profile))[0]
    target = 0.7 * full.figures["decode_s_estimated"]
    plans = feasible(loaded.spec, ranking(importance), "both", Budget(latency_s=target, profile=profile))
    assert all(p.figures["decode_s_estimated"] <= target for p in plans)
    with pytest.raises(ShrinkError, match="meets the budget"):
        feasible(loaded.spec, ranking(importance), "width", Budget(latency_s=1e-12, profile=profile))


def test_bad_budgets_are_refused(tiny_model):
    with pytest.raises(ShrinkError, match="Give a budget"):
        Budget()
    with pytest.raises(ShrinkError, match="between 0 and 1"):
        Budget(params=1.5)
    with pytest.raises(ShrinkError, match="needs a --target"):
        Budget(latency_s=0.01)
    with pytest.raises(ShrinkError, match="--axis"):
        grid(tiny_model("llama").spec, [0, 1], "sideways")


def test_proxy_ranks_candidates_by_held_out_kl(tiny_model, tmp_path, monkeypatch):
    from shrink.compress.data import split
    from shrink.compress.distill.teacher import teacher_topk

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    loaded = tiny_model("llama", num_hidden_layers=4)
    importance = score(loaded, CALIBRATION)
    data = split(torch.randint(0, 101, (24, 16), generator=torch.Generator().manual_seed(3)))
    plans = shortlist(feasible(loaded.spec, ranking(importance), "both", Budget(params=0.6)), 3)
    results = rank_by_proxy(plans, loaded, importance, data, teacher_topk(loaded.model, data.train, 16),
                            teacher_topk(loaded.model, data.evaluation, 16), steps=2, batch_size=2, workdir=tmp_path)
    assert len(results) == len(plans) >= 2
    assert [r.kl_proxy for r in results] == sorted(r.kl_proxy for r in results)
    assert all(r.tokens == 2 * 2 * 16 and r.kl_pruned > 0 for r in results)


def test_cli_prunes_to_a_parameter_budget_and_searches(tiny_text_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    runner = CliRunner()
    out = tmp_path / "p60"
    result = runner.invoke(app, ["prune", str(model_dir), "--params", "0.6", "--data", str(text), "--seq-len", "16",
                                 "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    from shrink.model import load

    again = load(str(out))
    # the saved model's tensors, counted: at most 60% of the 4-layer tiny Llama's 31,008 non-embedding
    # parameters (its 2 untied 101 x 32 tables aside), and its total is what the report says
    assert report["params_before"] == 31_008 + 2 * 101 * 32
    assert non_embedding(again.model) <= 0.6 * 31_008
    assert sum(p.numel() for p in again.model.parameters()) == report["params_after"]
    searched = runner.invoke(app, ["prune", str(model_dir), "--params", "0.5", "--axis", "both", "--search",
                                   "--candidates", "2", "--proxy-steps", "2", "--data", str(text), "--seq-len", "16",
                                   "-o", str(tmp_path / "s50"), "--json"])
    assert searched.exit_code == 0, searched.output
    candidates = json.loads(searched.stdout)["candidates"]
    assert len(candidates) == 2 and candidates[0]["kl_after_proxy"] <= candidates[1]["kl_after_proxy"]


@pytest.mark.parametrize("args, message", [
    (["--params", "0.5", "--ffn", "16"], "not both"),
    (["--search"], "budget"),
    (["--budget", "20"], "unit"),
    (["--budget", "20ms"], "needs a --target"),
    (["--memory", "lots"], "size"),
    (["--params", "0.001"], "meets the budget"),
])
def test_cli_refuses_bad_budget_options(tiny_text_model_dir, tmp_path, args, message, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    result = CliRunner().invoke(app, ["prune", str(model_dir), *args, "--data", str(text), "--seq-len", "16",
                                      "-o", str(tmp_path / "x")])
    assert result.exit_code == 2 and message in result.output
    assert not (tmp_path / "x").exists()


def test_cli_prunes_a_hybrid_ssm_model_by_sizes_and_by_budget(tiny_text_nemotron_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_nemotron_dir
    runner = CliRunner()
    common = ["--data", str(text), "--seq-len", "16", "--json"]
    result = runner.invoke(app, ["prune", str(model_dir), "--ssm-heads", "2", "--ssm-head-dim", "6", "--ffn", "40,24",
                                 "--heads", "1", "-o", str(tmp_path / "sized"), *common])
    assert result.exit_code == 0, result.output
    from shrink.model import load

    pruned = load(str(tmp_path / "sized")).spec
    kinds = [(type(layer.mixer).__name__, layer.ffn.width if layer.ffn else None) for layer in pruned.layers]
    assert kinds == [("SSMSpec", None), ("NoneType", 40), ("AttentionSpec", None), ("NoneType", 24), ("SSMSpec", None)]
    assert (pruned.layers[0].mixer.num_heads, pruned.layers[0].mixer.head_dim) == (4, 6)
    assert pruned.layers[2].mixer.num_heads == 2
    budget = runner.invoke(app, ["prune", str(model_dir), "--params", "0.7", "-o", str(tmp_path / "p70"), *common])
    assert budget.exit_code == 0, budget.output
    report = json.loads(budget.stdout)
    saved = load(str(tmp_path / "p70")).model
    assert non_embedding(saved) <= 0.7 * non_embedding(load(str(model_dir)).model)  # counted from the tensors
    assert sum(p.numel() for p in saved.parameters()) == report["params_after"]
