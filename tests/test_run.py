"""`shrink run`: recipes executed in a run directory with a report and --resume, and the budget planner."""

import json

import pytest

from shrink.flows.candidates import TargetBudget, parse_workload
from shrink.errors import ShrinkError


def test_budgets_and_workloads_parse_and_refuse_nonsense():
    budget = TargetBudget.parse(["20ms", "ttft=200ms,mem=2GB"])
    assert budget.tpot_s == pytest.approx(0.02) and budget.ttft_s == pytest.approx(0.2)
    assert budget.memory_bytes == pytest.approx(2e9)
    assert TargetBudget.parse(["tpot=1.5s"]).tpot_s == pytest.approx(1.5)
    for bad in (["20"], ["speed=3ms"], ["mem=lots"], []):
        with pytest.raises(ShrinkError):
            TargetBudget.parse(bad)
    workload = parse_workload("batch=2,gen=64")
    assert (workload.batch, workload.prompt_len, workload.gen_len) == (2, 512, 64)
    with pytest.raises(ShrinkError, match="--workload"):
        parse_workload("tokens=5")


@pytest.fixture(scope="module")
def planning(tiny_text_model_dir, tmp_path_factory):
    from shrink.compress.data import prepare
    from shrink.compress.importance import cached_score
    from shrink.model import load

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SHRINK_CACHE", str(tmp_path_factory.mktemp("cache")))
        model_dir, text = tiny_text_model_dir
        loaded = load(str(model_dir))
        split = prepare(loaded, str(text), seq_len=16)
        yield loaded, split, cached_score(loaded, split.calibration)


def test_candidates_are_costed_as_exported_and_an_impossible_budget_says_what_it_needs(planning):
    from shrink.flows.candidates import enumerate_candidates, no_plan_message
    from shrink.hardware.profiles import get_profile
    from shrink.hardware.roofline import Workload

    loaded, _, importance = planning
    profile = get_profile("jetson-orin-nano")
    candidates = enumerate_candidates(loaded, importance, profile, Workload(), TargetBudget(tpot_s=1e-9))
    assert not any(c.fits for c in candidates)
    by = {(c.keep, c.axis, c.format): c for c in candidates}
    original, q8 = by[(1.0, "-", None)], by[(1.0, "-", "int8")]
    assert q8.weights_bytes < original.weights_bytes and q8.tpot_s < original.tpot_s
    assert by[(0.6, "depth", None)].weights_bytes < original.weights_bytes
    # the tiny model's FFN rows of 48 do not divide into Q4_0's 32-element blocks: said, not costed
    assert by[(1.0, "-", "int4")].rejected and "32-element blocks" in by[(1.0, "-", "int4")].rejected
    message = no_plan_message(candidates, TargetBudget(tpot_s=1e-9), profile)
    assert message.startswith("No plan meets the budget") and "smaller" in message and "jetson-orin-nano" in message


def test_the_planner_picks_the_lowest_predicted_kl_within_budget(planning, tiny_text_model_dir):
    from shrink.flows.candidates import choose, enumerate_candidates, measure_proxies
    from shrink.flows.plan import RunSettings, recipe_for
    from shrink.hardware.profiles import get_profile
    from shrink.hardware.roofline import Workload

    loaded, split, importance = planning
    profile = get_profile("jetson-orin-nano")
    everything = enumerate_candidates(loaded, importance, profile, Workload(), TargetBudget(tpot_s=1.0))
    original = next(c for c in everything if c.shape is None and c.format is None)
    budget = TargetBudget(tpot_s=original.tpot_s * 0.9)  # the original misses it
    candidates = enumerate_candidates(loaded, importance, profile, Workload(), budget)
    measure_proxies(candidates, str(tiny_text_model_dir[0]), importance, split, proxy_steps=2, calibration="max")
    chosen = choose(candidates)
    assert chosen.fits and chosen.tpot_s <= budget.tpot_s
    fitting = [c for c in candidates if c.fits]
    assert chosen.predicted_kl == min(c.predicted_kl for c in fitting)
    assert all(c.predicted_kl >= 0 for c in fitting) and any(c.predicted_kl > 0 for c in fitting)
    names = [name for name, _ in recipe_for(chosen, RunSettings())]
    assert names[-3:] == ["export", "verify", "bench"]
    assert ("prune" in names) == (chosen.shape is not None) and ("quantize" in names) == (chosen.format is not None)


def test_the_planner_proposes_kv_transforms_when_time_to_first_token_or_memory_binds(planning, tiny_text_model_dir,
                                                                                      tmp_path, monkeypatch):
    """On an ONNX target with a TTFT line only SingleInputKV (prefill stops at layer k) meets a TTFT below the
    model's own; with a memory line below the model's, only cross-layer sharing (fewer caches) does. Neither
    is offered without such a line or on a llama.cpp target (no architecture runs them). The chosen plan runs:
    the transform's step, an ONNX export, verify against a gate that allows the transform's measured KL."""
    import dataclasses

    from shrink.flows.candidates import choose, enumerate_candidates, measure_proxies
    from shrink.flows.plan import RunSettings, recipe_for
    from shrink.flows.run import run_recipe
    from shrink.hardware.profiles import get_profile
    from shrink.hardware.roofline import Workload

    loaded, split, importance = planning
    h100, workload = get_profile("h100-sxm"), Workload(prompt_len=512)

    def candidates(budget, profile=h100):
        return enumerate_candidates(loaded, importance, profile, workload, budget, keeps=(1.0,))

    assert {c.kv for c in candidates(TargetBudget(tpot_s=1.0))} == {None}
    assert {c.kv for c in candidates(TargetBudget(ttft_s=1.0), get_profile("jetson-orin-nano"))} == {None}
    free = [c for c in candidates(TargetBudget(ttft_s=1.0)) if c.rejected is None]
    by = {(c.kv, c.format): c for c in free}
    plain, swift, shared = (by[(kv, None)] for kv in (None, "single-input-kv", "kv-share"))
    assert swift.ttft_s < plain.ttft_s and shared.memory_bytes < plain.memory_bytes
    assert swift.tpot_s == pytest.approx(plain.tpot_s, rel=0.01)  # decoding is unchanged but for kv_norm's read

    def between(kv, figure):  # a budget line only that transform's candidates meet, in some format
        return (min(figure(c) for c in free if c.kv is None) + min(figure(c) for c in free if c.kv == kv)) / 2

    for budget, kv in ((TargetBudget(ttft_s=between("single-input-kv", lambda c: c.ttft_s)), "single-input-kv"),
                       (TargetBudget(memory_bytes=between("kv-share", lambda c: c.memory_bytes)), "kv-share")):
        offered = candidates(budget)
        measure_proxies(offered, str(tiny_text_model_dir[0]), importance, split, proxy_steps=0, calibration="max")
        chosen = choose(offered)
        assert chosen.kv == kv and chosen.kl_kv > 0 and chosen.predicted_kl == pytest.approx(chosen.kl_kv + chosen.kl_format)
        assert {c.kv for c in offered if c.fits} == {kv}
    unquantized = dataclasses.replace(chosen, format=None)  # the run below skips quantizing (covered elsewhere)
    steps = recipe_for(unquantized, RunSettings(distill_tokens=256, qad_tokens=0, bench=False))
    assert [name for name, _ in steps] == ["kv-share", "distill", "export", "verify"]
    gate = steps[-1][1]
    assert gate.min_top1 == 0.0 and gate.max_kl > unquantized.kl_kv and "KV sharing's measured KL" in gate.reason

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    report = run_recipe(str(model_dir), steps, tmp_path / "run", data=str(text), seq_len=16)
    assert [s["status"] for s in report["steps"]] == ["finished"] * 4
    assert report["steps"][0]["metrics"]["groups"] and report["steps"][-1]["metrics"]["passed"]


def _recipe(tmp_path, body):
    path = tmp_path / "recipe.toml"
    path.write_text(body)
    return path


RECIPE = """description = "test"

[[step]]
name = "prune"
params = 0.6
axis = "depth"

[[step]]
name = "distill"
tokens = 1024
lr = 1e-3

[[step]]
name = "export"
format = "onnx"

[[step]]
name = "verify"
min_top1 = 0.0
"""


def test_a_recipe_runs_step_by_step_and_resumes_after_a_kill_mid_distillation(tiny_text_model_dir, tmp_path,
                                                                              monkeypatch):
    import contextlib

    from shrink.flows.recipe import parse_recipe
    from shrink.flows.run import read_report, run_recipe
    from shrink.flows.steps import Hooks
    from shrink.model import load

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    steps = parse_recipe(_recipe(tmp_path, RECIPE))
    run_dir = tmp_path / "run"

    class Killed(Exception):
        pass

    def killed_in_the_fifth_step(label, total, visible=True):
        def progress(step, loss, speed):
            if step == 5:  # the fourth step's checkpoint is written (every 2 of 16), the fifth's is not
                raise Killed  # as if the process died there

        return contextlib.nullcontext(progress)

    with pytest.raises(Killed):
        run_recipe(str(model_dir), steps, run_dir, data=str(text), seq_len=16,
                   hooks=Hooks(training=killed_in_the_fifth_step))
    interrupted = read_report(run_dir)
    assert [s["status"] for s in interrupted["steps"]] == ["finished", "running"]
    with pytest.raises(ShrinkError, match="--resume"):
        run_recipe(str(model_dir), steps, run_dir, data=str(text), seq_len=16)
    pruned_at = interrupted["steps"][0]["started"]
    report = run_recipe(str(model_dir), steps, run_dir, resume=True, data=str(text), seq_len=16)
    assert [s["name"] for s in report["steps"]] == ["prune", "distill", "export", "verify"]
    assert all(s["status"] == "finished" for s in report["steps"])
    assert report["steps"][0]["started"] == pruned_at  # the finished prune was not redone
    distilled = report["steps"][1]["metrics"]
    assert distilled["resumed_from"] == 4 and distilled["eval_after"]["kl"] < distilled["eval_before"]["kl"]
    pruned = load(report["steps"][0]["outputs"]["model"]).spec
    assert pruned.num_layers < load(str(model_dir)).spec.num_layers  # a real, smaller model
    assert report["final"]["artifact"].endswith("onnx")
    assert report["steps"][3]["metrics"]["passed"]
    changed = [(name, config) for name, config in steps[:-1]]
    with pytest.raises(ShrinkError, match="another model or recipe"):
        run_recipe(str(model_dir), changed, run_dir, resume=True, data=str(text), seq_len=16)


def test_cli_runs_a_recipe_and_refuses_malformed_recipes_and_impossible_budgets(tiny_text_model_dir, tmp_path,
                                                                                monkeypatch):
    from typer.testing import CliRunner

    from shrink.cli.app import app

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    runner = CliRunner()
    common = ["--data", str(text), "--seq-len", "16"]
    bad = _recipe(tmp_path, '[[step]]\nname = "prune"\nparams = 0.6\n\n[[step]]\nname = "distil"\n')
    result = runner.invoke(app, ["run", str(model_dir), "--recipe", str(bad), "-o", str(tmp_path / "bad"), *common])
    assert result.exit_code == 2 and "recipe.toml:6" in result.output and "unknown step 'distil'" in result.output
    assert not (tmp_path / "bad").exists()

    result = runner.invoke(app, ["run", str(model_dir), "--target", "jetson-orin-nano", "--budget", "0.001us",
                                 "-o", str(tmp_path / "impossible"), *common])
    assert result.exit_code == 2 and "No plan meets the budget" in result.output
    assert not (tmp_path / "impossible").exists()
    # Puzzle's no-op blocks reach below every prune shape, but not 1 fs: refused before any variant is trained
    result = runner.invoke(app, ["run", str(model_dir), "--target", "h100-sxm", "--budget", "0.000001us", "--puzzle",
                                 "-o", str(tmp_path / "impossible"), *common])
    assert result.exit_code == 2 and "No plan meets the budget" in result.output, result.output
    assert not (tmp_path / "impossible").exists()
    result = runner.invoke(app, ["run", str(model_dir), "--recipe", "demo", "--puzzle", "-o", str(tmp_path / "p")])
    assert result.exit_code == 2 and "--puzzle widens the planner's search" in result.output

    recipe = _recipe(tmp_path, RECIPE.replace('axis = "depth"', 'axis = "width"') + '\n[[step]]\nname = "bench"\nrepeats = 1\n')
    result = runner.invoke(app, ["run", str(model_dir), "--recipe", str(recipe), "-o", str(tmp_path / "ok"), *common,
                                 "--target", "jetson-orin-nano", "--budget", "1s,mem=1GB", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [s["name"] for s in report["steps"]] == ["prune", "distill", "export", "verify", "bench"]
    assert report["steps"][-1]["metrics"]["measured"]["decode_s_per_token"] > 0
    assert (tmp_path / "ok" / "recipe.toml").read_text() == recipe.read_text()
    check = report["budget_check"]  # a recipe with a budget: the artifact's own estimate gates it
    assert check["passed"] and [line["what"] for line in check["lines"]] == ["time per token", "memory"]
    assert all(line["by"] == "estimated" and line["value"] < line["budget"] for line in check["lines"])


def test_cli_dry_run_plans_without_writing_a_run(tiny_bpe_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from shrink.cli.app import app

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_bpe_model_dir  # a plan on a llama.cpp target needs a tokenizer llama.cpp can run
    args = ["run", str(model_dir), "--target", "jetson-orin-nano", "--data", str(text), "--seq-len", "16",
            "--proxy-steps", "0", "-o", str(tmp_path / "run")]
    result = CliRunner().invoke(app, [*args, "--budget", "1s", "--dry-run", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    original = next(c for c in plan["candidates"] if c["shape"] is None and c["format"] is None)
    tight = original["tpot_s_estimated"] * 0.9
    result = CliRunner().invoke(app, [*args, "--budget", f"{tight * 1e6:.3f}us", "--dry-run", "--json",
                                      "--plot", str(tmp_path / "pareto.png")])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    assert plan["chosen"]["tpot_s_estimated"] <= tight and plan["chosen"]["label"] != original["label"]
    assert "lowest predicted KL" in plan["why"]
    assert (tmp_path / "pareto.png").stat().st_size > 10_000
    shown = CliRunner().invoke(app, [*args, "--budget", "1s", "--dry-run", "--top", "3"], terminal_width=200)
    assert shown.exit_code == 0 and f"3 of {len(plan['candidates'])} candidates shown" in shown.stdout
    assert shown.stdout.index("chosen") < shown.stdout.index("within budget")
    assert not (tmp_path / "run").exists()


def test_on_host_the_measured_decode_time_decides_the_budget():
    from shrink.flows.plan import budget_check

    plan = {"target": "host", "budget": {"tpot_s": 0.012, "ttft_s": None, "memory_bytes": None},
            "workload": {"batch": 1, "prompt_len": 512, "gen_len": 128}, "host_kernels": None}
    report = {"final": {"artifact": None}, "steps": [
        {"name": "bench", "metrics": {"measured": {"decode_s_per_token": 0.0131}}}]}
    check = budget_check(plan, report)
    assert not check["passed"] and check["lines"][0]["by"] == "measured"
    report["steps"][0]["metrics"]["measured"]["decode_s_per_token"] = 0.0098
    assert budget_check(plan, report)["passed"]


def test_the_prediction_is_the_plans_measurement_of_a_timed_file_else_the_anchored_roofline(tiny_model, tmp_path):
    from shrink.export.workflow import export_artifact
    from shrink.flows.plan import artifact_estimate

    export_artifact(tiny_model("llama"), "gguf", tmp_path / "m.gguf", quant="q8_0", verify=False)
    report = {"final": {"artifact": str(tmp_path / "m.gguf")}, "steps": []}
    plan = {"target": "jetson-orin", "workload": {"batch": 1, "prompt_len": 512, "gen_len": 128}, "host_kernels": None,
            "chosen": {"anchor": None, "quantizer": None}}
    roofline = artifact_estimate(report, plan)
    assert roofline["tpot_s_predicted"] == roofline["tpot_s_estimated"] == roofline["tpot_s_roofline"] > 0
    assert roofline["predicted_by"] == "estimated: roofline"

    plan["chosen"]["anchor"] = {"label": "Q8_0", "ratio": 1.25}
    anchored = artifact_estimate(report, plan)
    assert anchored["tpot_s_predicted"] == pytest.approx(1.25 * roofline["tpot_s_roofline"])
    assert "1.250 (Q8_0)" in anchored["predicted_by"]

    # a file the quantizer search timed on the target: the plan chose it on that measurement
    plan["chosen"] = {"anchor": None, "quantizer": {"cost": {"tpot_s": 0.0123, "by": "measured"}}}
    timed = artifact_estimate(report, plan)
    assert timed["tpot_s_predicted"] == 0.0123 and timed["predicted_by"] == "measured while planning"
    assert timed["tpot_s_estimated"] == roofline["tpot_s_roofline"]  # the estimate stays an estimate


def test_on_a_measured_target_candidates_are_judged_the_machines_spread_below_the_budget():
    from dataclasses import replace

    from shrink.flows.plan import HEADROOM_CAP, headroom_said, with_headroom
    from shrink.hardware.calibration import KernelRate, RuntimeCalibration
    from shrink.hardware.profiles import get_profile

    def kernels(runtime, spread):
        return RuntimeCalibration(runtime, {"q8_0": KernelRate(10.0, 0.2)}, 1e-5, 1e-5, 1e-4, 1e-4, 2, "test", spread)

    budget = TargetBudget(tpot_s=0.020, memory_bytes=1e9)
    published = get_profile("jetson-orin")
    assert with_headroom(budget, published) == (budget, 0.0)  # an estimate decides there: no run-to-run noise
    host = replace(published, measured=True, calibrations={"llama.cpp": kernels("llama.cpp", 0.05),
                                                           "onnxruntime": kernels("onnxruntime", 0.03)})
    judged, headroom = with_headroom(budget, host)
    assert headroom == 0.05 and judged.tpot_s == pytest.approx(0.019) and judged.memory_bytes == 1e9
    assert "19.00 ms" in headroom_said(judged.tpot_s, headroom) and "5.0%" in headroom_said(judged.tpot_s, headroom)
    noisy = replace(host, calibrations={"llama.cpp": kernels("llama.cpp", 0.43)})
    assert with_headroom(budget, noisy)[1] == HEADROOM_CAP
    assert with_headroom(TargetBudget(memory_bytes=1e9), host) == (TargetBudget(memory_bytes=1e9), 0.0)
    assert headroom_said(0.02, 0.0) == ""


def test_the_plan_view_ranks_candidates_best_first():
    from shrink.cli.run import _ranked

    def candidate(label, kl, tpot, misses=(), rejected=None):
        return {"label": label, "predicted_kl": kl, "tpot_s_estimated": tpot, "misses": list(misses),
                "rejected": rejected}

    candidates = [candidate("slow", 0.01, 9e-3, misses=["time/token"]), candidate("odd", None, 1e-3, rejected="rows"),
                  candidate("b", 0.5, 2e-3), candidate("chosen", 0.2, 3e-3), candidate("a", 0.3, 1e-3),
                  candidate("slower", 0.0, 12e-3, misses=["time/token"])]
    assert [c["label"] for c in _ranked(candidates, "chosen")] == ["chosen", "a", "b", "slow", "slower", "odd"]


def test_a_planned_recipe_verifies_against_the_registry_gate():
    from shrink.flows.candidates import Candidate
    from shrink.flows.plan import verify_gate

    # unpruned Q8_0 on llama.cpp: the 8-bit tier of the registry, top-1 97% and KL 0.03
    step = verify_gate(Candidate(1.0, "-", "int8", "gguf"))
    assert (step.min_top1, step.max_kl) == (0.97, 0.03) and "q8_0" in step.reason
    # pruned to 60% width then Q4_0: the 4-bit KL bound 0.40 plus the shape's measured 1.5, top-1 not gated
    step = verify_gate(Candidate(0.6, "width", "int4", "gguf", shape=object(), kl_shape=1.5))
    assert (step.min_top1, step.max_kl) == (0.0, 1.9) and "q4_0" in step.reason


def test_a_run_whose_artifact_misses_its_verify_gate_exits_1(tiny_text_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from shrink.cli.app import app

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    # an 8-bit export passes its own gate against its model but is never at KL 0 from it: the verify
    # step's bound cannot be met
    recipe = _recipe(tmp_path, '[[step]]\nname = "export"\nformat = "onnx"\nquant = "int8"\n\n[[step]]\nname = "verify"\n'
                               'max_kl = 0.0\nreason = "a bound no artifact meets"\n')
    result = CliRunner().invoke(app, ["run", str(model_dir), "--recipe", str(recipe), "-o", str(tmp_path / "r"),
                                      "--data", str(text), "--seq-len", "16", "--json"])
    assert result.exit_code == 1, result.output
    report = json.loads((tmp_path / "r" / "run.json").read_text())
    assert report["steps"][-1]["name"] == "verify" and report["steps"][-1]["status"] == "failed"


def test_an_impossible_budget_is_refused_from_the_config_before_any_weight_is_loaded(tiny_llama_dir, monkeypatch):
    import shrink.flows.plan as flow_plan

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded for a budget the config already rules out")

    monkeypatch.setattr(flow_plan, "load", no_loading)
    monkeypatch.setattr(flow_plan, "prepare", no_loading)
    with pytest.raises(flow_plan.NoPlan, match="No plan meets the budget") as refused:
        flow_plan.plan(str(tiny_llama_dir), "jetson-orin-nano", ["0.001us"])
    assert refused.value.closest  # the nearest candidates come with it
    # a budget the fastest candidate meets is not refused early: the plan goes on to load the model
    with pytest.raises(AssertionError, match="weights were loaded"):
        flow_plan.plan(str(tiny_llama_dir), "jetson-orin-nano", ["1s"])


def test_resume_with_nothing_to_resume_says_so(tmp_path):
    from typer.testing import CliRunner

    from shrink.cli.app import app

    result = CliRunner().invoke(app, ["run", "gemma-3-270m", "--resume", "-o", str(tmp_path / "none")])
    assert result.exit_code == 2 and "Nothing to resume" in result.output
    assert not (tmp_path / "none").exists()


def test_a_gguf_quantize_step_makes_the_artifact_with_llama_cpps_quantizer(tiny_llama_dir, tmp_path, monkeypatch):
    import torch

    from shrink.compress.data import DataSplit
    from shrink.errors import ShrinkError
    from shrink.flows.recipe import GGUFQuantizeStep, VerifyStep
    from shrink.flows.run import RunState, gguf_quantize_step, verify_step
    from shrink.ggufmeta import tensor_infos

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    ids = torch.randint(1, 101, (6, 16), generator=torch.Generator().manual_seed(0))
    split = DataSplit(ids[:2], ids[2:4], ids[4:], "random ids")  # the tiny model has no tokenizer to read text
    state = RunState(model=str(tiny_llama_dir), run_dir=tmp_path, current=str(tiny_llama_dir),
                     _split=(None, split))  # (the vocabulary trim it was made for, the split)
    record = gguf_quantize_step(state, GGUFQuantizeStep(file_type="Q8_0", overrides="token_embd.weight=q4_0"),
                                tmp_path / "01-gguf-quantize")
    artifact = record["outputs"]["artifact"]
    types = {t.name: t.ggml_type for t in tensor_infos(artifact)}
    assert types["token_embd.weight"] == "Q4_0" and types["blk.0.attn_q.weight"] == "Q8_0"
    assert record["metrics"]["chosen"]["imatrix"] and record["metrics"]["export"]["file_type"] == "Q8_0"
    assert not list(tmp_path.glob("*.work"))  # the search's files are gone
    state.artifact = artifact
    verified = verify_step(state, VerifyStep(), tmp_path / "02-verify")  # the manifest names the source
    assert verified["metrics"]["metrics"]["mean_kl"] > 0
    # choosing among file types needs a budget to choose under
    with pytest.raises(ShrinkError, match="give --target and --budget"):
        gguf_quantize_step(state, GGUFQuantizeStep(), tmp_path / "03-gguf-quantize")


def test_a_depth_cut_out_of_gemma_3s_window_pattern_is_no_gguf_candidate():
    from transformers import Gemma3TextConfig

    from shrink.families import spec_from_config
    from shrink.flows.candidates import candidates_for
    from shrink.hardware.profiles import get_profile
    from shrink.hardware.roofline import Workload
    from tiny_models import COMMON

    # layers 5 and 11 global, as llama.cpp assumes
    spec = spec_from_config(Gemma3TextConfig(num_hidden_layers=12, head_dim=16, sliding_window=8,
                                             query_pre_attn_scalar=16, **COMMON))
    ranking = list(range(11, -1, -1))  # the last layers ranked first: every depth cut keeps a suffix, off the pattern
    gguf = {(c.keep, c.axis, c.format): c
            for c in candidates_for(spec, ranking, get_profile("jetson-orin-nano"), Workload(), TargetBudget(tpot_s=1.0))}
    depth = [c for key, c in gguf.items() if key[1] == "depth"]
    assert depth and all(c.rejected and "5-local / 1-global" in c.rejected for c in depth)
    # never costed: no figures in the plan's JSON (not a zero time), a dash in the candidates table
    assert all(c.to_dict()["tpot_s_estimated"] is None and c.to_dict()["memory_bytes_estimated"] is None for c in depth)
    from shrink.cli.run import _candidates_table

    width = next(c for key, c in gguf.items() if key[1] == "width" and key[2] is None)
    table = _candidates_table([depth[0].to_dict(), width.to_dict()], None, "t")
    times = list(table.columns[1].cells)
    assert times[0] == "-" and times[1] != "-"
    assert all(c.rejected is None for key, c in gguf.items() if key[1] == "width" and key[2] is None)
    onnx = candidates_for(spec, ranking, get_profile("h100-sxm"), Workload(), TargetBudget(tpot_s=1.0))
    assert not any(c.rejected and "5-local" in c.rejected for c in onnx)  # ONNX runs any layer order


def test_the_planner_proposes_puzzle_and_the_run_makes_the_architecture_it_costed(planning, tiny_text_model_dir,
                                                                                  tmp_path, monkeypatch):
    """With --puzzle, below the fastest prune shape only Puzzle architectures fit: one per format, trained
    and scored once in the run directory; the chosen one's recipe is puzzle, distill, export, verify, and
    its puzzle step reads the planner's variants back and builds the architecture the plan costed."""
    from shrink.compress.puzzle.solve import assembled_spec, choice_from_names
    from shrink.flows.candidates import enumerate_candidates
    from shrink.flows.plan import RunSettings, plan
    from shrink.flows.run import execute
    from shrink.hardware.profiles import get_profile
    from shrink.hardware.roofline import Workload
    from shrink.model import load

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    loaded, _, importance = planning
    model_dir, text = tiny_text_model_dir
    shapes = enumerate_candidates(loaded, importance, get_profile("h100-sxm"), Workload(), TargetBudget(tpot_s=1.0))
    budget = min(c.tpot_s for c in shapes if c.rejected is None) * 0.8
    work = tmp_path / "run" / "puzzle-search"
    planned = plan(str(model_dir), "h100-sxm", [f"{budget * 1e3:.9f}ms"], proxy_steps=2, proxy_calibration="max",
                   data=str(text), seq_len=16, settings=RunSettings(distill_tokens=2048, qad_tokens=0, bench=False),
                   puzzle_work=work)
    fitting = [c for c in planned["candidates"] if not c["misses"] and c["rejected"] is None]
    assert fitting and {c["axis"] for c in fitting} == {"puzzle"}
    assert planned["puzzle"]["offered"] and (work / "scores.json").is_file()
    chosen = planned["chosen"]
    assert chosen["axis"] == "puzzle" and chosen["tpot_s_estimated"] <= budget and chosen["kl_shape_measured"] > 0
    trained = {p: p.stat().st_mtime_ns for p in (work / "bld").rglob("*") if p.is_file()}
    steps = planned.pop("steps")
    names = [name for name, _ in steps]
    assert names[:2] == ["puzzle", "distill"] and names[-2:] == ["export", "verify"]
    unquantized = [(n, c) for n, c in steps if n != "quantize"]  # quantizing is covered elsewhere
    report = execute(str(model_dir), unquantized, tmp_path / "run", data=str(text), seq_len=16, plan=planned)
    assert [s["status"] for s in report["steps"]] == ["finished"] * len(unquantized)
    metrics = report["steps"][0]["metrics"]
    assert metrics["solutions"][0]["layers"] == chosen["shape"]["puzzle"]["layers"]  # chosen again, as planned
    assert {p: p.stat().st_mtime_ns for p in (work / "bld").rglob("*") if p.is_file()} == trained  # not retrained
    assert metrics["chosen_estimated"]["decode_s"] == pytest.approx(chosen["tpot_s_estimated"], rel=1e-9)
    child = load(report["steps"][0]["outputs"]["model"])
    assert child.spec.layers == assembled_spec(loaded.spec, choice_from_names(metrics["solutions"][0]["layers"])).layers
    assert child.spec.param_counts().non_embedding < loaded.spec.param_counts().non_embedding


def test_puzzle_offers_only_what_the_targets_runtime_runs(tiny_model):
    from shrink.flows.puzzle import PuzzleSettings, runnable_library

    llama, gemma = tiny_model("llama"), tiny_model("gemma3")
    gguf, onnx = (PuzzleSettings(target="h100-sxm", budget_s=1.0, export=kind) for kind in ("gguf", "onnx"))
    names = {v.key for variants in runnable_library(llama.spec, gguf) for v in variants}
    assert "ffn:linear" not in names and "ffn:none" in names and "attention:linear" in names  # what deci runs
    assert "ffn:linear" in {v.key for variants in runnable_library(gemma.spec, onnx) for v in variants}
    with pytest.raises(ShrinkError, match="cannot be a GGUF"):
        runnable_library(gemma.spec, gguf)
