"""Choosing prune shapes under a budget: the planned ArchSpec is the one pruning produces, every
candidate meets the budget, and the CLI turns a budget into a saved, smaller model."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from shrink.cli.app import app
from shrink.compress.importance import score
from shrink.compress.search import Budget, apply, default_plan, feasible, grid, rank_by_proxy, shortlist
from shrink.errors import ShrinkError
from shrink.families import spec_from_model
from shrink.hardware.profiles import get_profile
from shrink.model import LoadedModel
from tiny_models import tiny_configs

CALIBRATION = torch.randint(0, 101, (6, 24), generator=torch.Generator().manual_seed(1))


def tiny(name, layers=None):
    torch.manual_seed(0)
    config = tiny_configs()[name]
    if layers:
        config.num_hidden_layers = layers
    model = AutoModelForCausalLM.from_config(config).eval()
    return LoadedModel(model, None, spec_from_model(model), f"tiny-{name}")


def ranking(importance):
    return importance.layers.argsort(descending=True).tolist()


@pytest.mark.parametrize("family", ["llama", "gemma3", "qwen3"])
def test_planned_spec_is_the_pruned_models_spec(family):
    loaded = tiny(family)
    importance = score(loaded, CALIBRATION)
    plans = feasible(loaded.spec, ranking(importance), "both", Budget(params=0.5))
    for plan in shortlist(plans, 3):
        pruned = apply(plan, loaded, importance)
        assert sum(p.numel() for p in pruned.model.parameters()) == plan.spec.param_counts().total
        assert pruned.spec.param_counts() == plan.spec.param_counts()


def test_every_feasible_candidate_meets_a_parameter_budget():
    loaded = tiny("llama", layers=4)
    importance = score(loaded, CALIBRATION)
    limit = 0.6 * loaded.spec.param_counts().non_embedding
    for axis in ("width", "depth", "both"):
        plans = feasible(loaded.spec, ranking(importance), axis, Budget(params=0.6))
        assert plans and all(p.figures["non_embedding_params"] <= limit for p in plans)
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


def test_latency_budget_is_met_by_estimate_and_an_impossible_one_is_refused():
    loaded = tiny("llama", layers=4)
    importance = score(loaded, CALIBRATION)
    profile = get_profile("jetson-orin")
    full = feasible(loaded.spec, ranking(importance), "both", Budget(latency_s=1.0, profile=profile))[0]
    target = 0.7 * full.figures["decode_s_estimated"]
    plans = feasible(loaded.spec, ranking(importance), "both", Budget(latency_s=target, profile=profile))
    assert all(p.figures["decode_s_estimated"] <= target for p in plans)
    with pytest.raises(ShrinkError, match="meets the budget"):
        feasible(loaded.spec, ranking(importance), "width", Budget(latency_s=1e-12, profile=profile))


def test_bad_budgets_are_refused():
    with pytest.raises(ShrinkError, match="Give a budget"):
        Budget()
    with pytest.raises(ShrinkError, match="between 0 and 1"):
        Budget(params=1.5)
    with pytest.raises(ShrinkError, match="needs a --target"):
        Budget(latency_s=0.01)
    with pytest.raises(ShrinkError, match="--axis"):
        grid(tiny("llama").spec, [0, 1], "sideways")


def test_proxy_ranks_candidates_by_held_out_kl(tmp_path, monkeypatch):
    from shrink.compress.data import split
    from shrink.compress.distill.teacher import teacher_topk

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    loaded = tiny("llama", layers=4)
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
    assert report["chosen"]["non_embedding_params"] <= 0.6 * report["non_embedding_before"]
    from shrink.model import load

    again = load(str(out))
    assert again.spec.param_counts().total == report["params_after"] < report["params_before"]
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
    assert report["chosen"]["non_embedding_params"] <= 0.7 * report["non_embedding_before"]
    assert load(str(tmp_path / "p70")).spec.param_counts().total == report["params_after"]
