"""Executing a recipe: each step in turn on the output of the one before, in a run directory.

    run_dir/
      recipe.toml        the steps (written by the planner, or copied from --recipe)
      plan.json          the plan, or a recipe's budget gate, when there is one
      run.json           the run report: per step its config, inputs, outputs, metrics, time, status
      01-prune/          each step's output (a model directory, an artifact, checkpoints)
      02-distill/ ...

run.json is rewritten (atomically) whenever a step starts, finishes or fails, so a killed run leaves
a report that says how far it got, and `resume=True` skips the finished steps and restarts the
interrupted one (a distillation continues from its last checkpoint). The teacher, the verify
reference and the data are always the original model's. The steps themselves are flows/steps.py's,
the same functions `shrink prune`, `distill` and `quantize` call.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from shrink.compress.data import prepare
from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.search import Budget
from shrink.errors import ShrinkError
from shrink.export.backend import backend
from shrink.export.bench import bench
from shrink.export.manifest import manifest_path
from shrink.export.workflow import export_artifact, verify_artifact
from shrink.flows import defaults
from shrink.flows import steps as flow
from shrink.flows.candidates import TargetBudget
from shrink.flows.gguf_quantize import budget_fits, make_option, prepare_search, target_cost, write_choice
from shrink.flows.gguf_search import parse_overrides, run_search
from shrink.flows.plan import artifact_estimate, budget_check, planned_profile
from shrink.flows.preflight import refuse_early
from shrink.flows.kvshare import share
from shrink.flows.puzzle import PuzzleSettings, puzzle
from shrink.flows.recipe import parse_recipe, shipped_recipes, step_to_dict
from shrink.flows.resources import check as check_resources
from shrink.flows.resources import run_needs
from shrink.flows.steps import Hooks
from shrink.flows.swiftkv import single_input
from shrink.flows.vocab import tokenizer_of, trim_vocab
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload
from shrink.model import load, load_spec, save_loaded
from shrink.storage import atomic_write_text, directory_lock, fault_point, remove_leftovers
from shrink.units import parse_duration
from shrink.vocabmap import CONFIG_KEY, VocabTrim, kept_view

REPORT = "run.json"
PLAN_FILE = "plan.json"


class StepFailed(Exception):
    """A step ran but its result failed a gate (verification); the run stops with exit code 1."""


@dataclass
class RunState:
    model: str  # the original model: teacher, data source and verify reference
    run_dir: Path
    data: str | None = None
    seq_len: int = defaults.SEQ_LEN
    current: str = ""  # the model the next step starts from
    plan: dict | None = None  # target, budget and workload of a planned or budget-gated run
    artifact: str | None = None  # the last exported artifact
    hooks: Hooks = field(default_factory=Hooks)
    _teacher: Any = None
    _split: Any = None
    _topk: dict = field(default_factory=dict)

    def original(self) -> Any:
        if self._teacher is None:
            self._teacher = flow.load_model(self.model, self.hooks)
        return self._teacher

    def teacher(self) -> Any:
        """The original model; after a trim-vocab step, read over the current model's kept tokens."""
        trim = self.trim()
        if trim is None:
            return self.original()
        original = self.original()
        return replace(original, model=kept_view(original.model, trim), spec=replace(original.spec, vocab_size=trim.size),
                       tokenizer=tokenizer_of(self.current))

    def trim(self) -> Any:
        """The vocabulary trim the current model records (vocabmap.py), or None."""
        config = Path(self.current, "config.json")
        recorded = json.loads(config.read_text()).get(CONFIG_KEY) if config.is_file() else None
        return VocabTrim.from_dict(recorded) if recorded else None

    def split(self) -> Any:
        key = self.trim()
        if self._split is None or self._split[0] != key:  # the text in the current vocabulary's ids
            tokenizer = tokenizer_of(self.current) if key is not None else None
            self.hooks.status("Preparing the calibration, training and held-out text")
            self._split = (key, prepare(self.original(), self.data, seq_len=self.seq_len, tokenizer=tokenizer))
            self._topk = {}
        return self._split[1]

    def student(self) -> Any:
        return load(self.current)  # a fresh copy: steps change models in place

    def teacher_topk(self, part: str) -> Any:
        split = self.split()
        if part not in self._topk:
            self.hooks.status("Teacher top-k logits (cached on disk after the first run)")
            self._topk[part] = teacher_topk(self.teacher().model, getattr(split, part))
        return self._topk[part]

    def artifact_or_fail(self) -> str:
        if self.artifact is None:
            raise ShrinkError("A verify or bench step needs an export step before it.")
        return self.artifact


# --- the recipe's steps: each takes the state and its config, writes into `out`, returns its record ---

def _save(loaded: Any, out: Path) -> str:
    save_loaded(loaded, out)
    return str(out)


def prune_step(state: RunState, config: Any, out: Path) -> dict:
    sizes = {"ffn": config.ffn, "heads": config.heads, "hidden": config.hidden, "layers": config.layers}
    given = {k: v for k, v in sizes.items() if v is not None}
    loaded = state.student()
    before = loaded.spec.param_counts().total
    result = flow.prune(loaded, state.split(), state.hooks, sizes=given,
                        budget=Budget(params=config.params) if config.params is not None else None,
                        axis=config.axis, search=config.search)
    pruned = result.model
    metrics = {"params_before": before, "params_after": pruned.spec.param_counts().total,
               "shape": result.report.get("chosen", given), "chosen_by": result.report.get("chosen_by", "sizes given"),
               "held_out_after_pruning": flow.evaluate_against(pruned.model, state.split(),
                                                               state.teacher_topk("evaluation"))}
    return {"outputs": {"model": _save(pruned, out)}, "metrics": metrics}


def trim_vocab_step(state: RunState, config: Any, out: Path) -> dict:
    trimmed, report = trim_vocab(state.student(), state.data, state.hooks, size=config.vocab, coverage=config.coverage,
                                 seq_len=state.seq_len, target=(state.plan or {}).get("target"), writer=state.original())
    return {"outputs": {"model": _save(trimmed, out)}, "metrics": report}


def puzzle_step(state: RunState, config: Any, out: Path) -> dict:
    plan = state.plan or {}
    target = config.target or plan.get("target")
    limits = dict(plan.get("budget") or {})
    if config.budget:
        limits = {"tpot_s": parse_duration(config.budget, "the puzzle step's budget")}
    if target is None or not any(limits.get(k) is not None for k in ("tpot_s", "ttft_s", "memory_bytes")):
        raise ShrinkError("A puzzle step needs a target and a budget: set target and budget in the step, "
                          "or give the run --target and --budget.")
    settings = PuzzleSettings(target=target, budget_s=limits.get("tpot_s"), ttft_s=limits.get("ttft_s"),
                              memory_bytes=limits.get("memory_bytes"), weights=config.weights,
                              bld_steps=config.bld_steps, distill_tokens=0, export=config.export,
                              workload=Workload(**plan["workload"]) if "workload" in plan else Workload())
    # the profile the plan was costed on (host: with its calibrated kernels), so a planned step chooses as planned
    profile = planned_profile(plan) if plan.get("target") == target else None
    work = Path(config.work) if config.work else Path(f"{out}.work")
    child, report = puzzle(state.student(), state.split(), settings, work, state.hooks, profile)
    metrics = {k: report[k] for k in ("target", "solutions", "parent_estimated", "chosen_estimated", "limits")}
    metrics["held_out_after_assembly"] = flow.evaluate_against(child.model, state.split(), state.teacher_topk("evaluation"))
    return {"outputs": {"model": _save(child, out)}, "metrics": metrics}


def kv_share_step(state: RunState, config: Any, out: Path) -> dict:
    shared, metrics = share(state.student(), state.split().calibration, state.hooks, groups=config.groups,
                            pairs=config.pairs, init=config.init, target=(state.plan or {}).get("target", "host"))
    metrics["held_out_after_sharing"] = flow.evaluate_against(shared.model, state.split(), state.teacher_topk("evaluation"))
    return {"outputs": {"model": _save(shared, out)}, "metrics": metrics}


def single_input_kv_step(state: RunState, config: Any, out: Path) -> dict:
    checkpoints = Path(f"{out}.checkpoints")
    swift, metrics = single_input(state.student(), state.teacher(), state.split(), state.hooks,
                                  (state.teacher_topk("train"), state.teacher_topk("evaluation")), checkpoints,
                                  k=config.k, tokens=config.tokens, lr=config.lr, queries=config.queries,
                                  seq_len=state.seq_len, target=(state.plan or {}).get("target", "host"))
    path = _save(swift, out)
    shutil.rmtree(checkpoints, ignore_errors=True)
    return {"outputs": {"model": path}, "metrics": metrics}


def distill_step(state: RunState, config: Any, out: Path) -> dict:
    settings = flow.distill_config(config.tokens, state.seq_len, loss=config.loss, lr=config.lr,
                                   batch_size=config.batch_size)
    student = state.student()
    report = flow.distill(student, state.teacher(), state.split(), settings, Path(f"{out}.checkpoints"), state.hooks,
                          topk=(state.teacher_topk("train"), state.teacher_topk("evaluation")))
    path = _save(student, out)
    shutil.rmtree(f"{out}.checkpoints", ignore_errors=True)  # the step is done: the model is the result
    return {"outputs": {"model": path}, "metrics": {k: v for k, v in asdict(report).items() if k != "history"}}


def quantize_step(state: RunState, config: Any, out: Path) -> dict:
    settings = flow.quantize_settings(config.format, runtime=config.runtime, calibration=config.calibration,
                                      qad=config.qad, tokens=config.tokens, lr=config.lr)
    student = state.student()
    report = flow.quantize(student, state.teacher(), state.split(), settings, Path(f"{out}.checkpoints"), state.hooks)
    path = _save(student, out)
    shutil.rmtree(f"{out}.checkpoints", ignore_errors=True)
    report["fallbacks"] = len(report["fallbacks"])  # the per-tensor list is in the model's plan
    report["kept_high_precision"] = len(report["kept_high_precision"])
    return {"outputs": {"model": path}, "metrics": report}


def gguf_quantize_step(state: RunState, config: Any, out: Path) -> dict:
    """llama.cpp's quantizer on the current model: the named file type (and overrides), or with
    file_type auto every candidate measured and the lowest KL within the run's budget kept."""
    loaded = state.student()
    search_all = config.file_type.lower() == "auto"
    if search_all and (state.plan is None or not any(v is not None for v in state.plan["budget"].values())):
        raise ShrinkError("A gguf-quantize step with file_type auto chooses under the run's budget: give --target "
                          "and --budget, or name a file type (Q4_K_M, IQ4_XS, ...).")
    overrides = parse_overrides(config.overrides)
    if state.plan is not None:
        cost = target_cost(loaded.spec, get_profile(state.plan["target"]), Workload(**state.plan["workload"]))
        # with the plan's headroom, if it took one
        fits = budget_fits(TargetBudget(**(state.plan.get("planned_against") or state.plan["budget"])))
    else:
        cost = target_cost(loaded.spec, get_profile("host"), Workload())
        fits = lambda _cost: True  # noqa: E731 — a named file type is made whatever it costs
    work = Path(f"{out}.work")
    try:
        search = prepare_search(loaded, state.split(), work, cost, fits, imatrix=config.imatrix,
                                status=state.hooks.status)
        if search_all:
            chosen = run_search(search)
            if chosen is None:
                fastest = min(search.options, key=lambda o: o.cost.tpot_s)
                raise StepFailed(f"no quantization meets the budget: the fastest, {fastest.label}, takes "
                                 f"{fastest.cost.tpot_s * 1e3:.2f} ms per token ({fastest.cost.by})")
        else:
            chosen = make_option(search, config.file_type, config.imatrix, overrides)
        artifact = backend("gguf").artifact_in(out)
        report = write_choice(chosen, loaded, artifact)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"outputs": {"artifact": str(artifact), "manifest": str(manifest_path(artifact))},
            "metrics": {"bytes_on_disk": artifact.stat().st_size, "export": report, "chosen": chosen.to_dict(),
                        "candidates": [o.to_dict() for o in search.options]}}


def export_step(state: RunState, config: Any, out: Path) -> dict:
    loaded = state.student()
    artifact = backend(config.format).artifact_in(out)
    state.hooks.status(f"Exporting to {config.format} and checking it in its runtime against the model")
    result = export_artifact(loaded, config.format, artifact, quant=config.quant)
    size = sum(p.stat().st_size for p in ([artifact] if artifact.is_file() else artifact.rglob("*")) if p.is_file())
    record = {"outputs": {"artifact": str(artifact), "manifest": str(result.manifest)},
              "metrics": {"bytes_on_disk": size, "export": result.report,
                          "verify_against_model": result.verdict.to_dict() if result.verdict else None}}
    if result.verdict is not None and not result.verdict.passed:
        raise StepFailed(f"the {config.format} artifact does not match the model it was exported from: "
                         + "; ".join(c.detail for c in result.verdict.checks if not c.passed))
    return record


def verify_step(state: RunState, config: Any, out: Path) -> dict:
    state.hooks.status(f"Verifying the artifact against {state.model}")
    # The per-format defaults of `shrink verify` judge an export's fidelity; a compressed model is
    # judged against the original only by the gates the recipe sets (the metrics are always recorded).
    gated = config.min_top1 is not None or config.max_kl is not None
    verdict = verify_artifact(state.artifact_or_fail(), state.model,
                              min_top1=config.min_top1 if config.min_top1 is not None else 0.0,
                              max_kl=config.max_kl if config.max_kl is not None else float("inf"))
    record = {"outputs": {}, "metrics": {**verdict.to_dict(), "gated": gated}}
    if not verdict.passed:
        raise StepFailed(f"the artifact fails verification against {state.model}: "
                         + "; ".join(c.detail for c in verdict.checks if not c.passed))
    return record


def bench_step(state: RunState, config: Any, out: Path) -> dict:
    state.hooks.status("Timing the artifact in its runtime on this machine")
    result = bench(state.artifact_or_fail(), config.threads, prompt_len=config.prompt_len, gen_len=config.gen_len,
                   repeats=config.repeats)
    return {"outputs": {}, "metrics": result.to_dict()}


EXECUTORS: dict[str, Callable[[RunState, Any, Path], dict]] = {
    "prune": prune_step, "trim-vocab": trim_vocab_step, "puzzle": puzzle_step, "kv-share": kv_share_step,
    "single-input-kv": single_input_kv_step, "distill": distill_step, "quantize": quantize_step, "gguf-quantize": gguf_quantize_step,
    "export": export_step,
    "verify": verify_step, "bench": bench_step,
}


# --- the run ---

def read_report(run_dir: Path) -> dict | None:
    path = Path(run_dir) / REPORT
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        raise ShrinkError(f"{path} is not valid JSON; it was not written by shrink run, or was damaged.") from None


def _write_report(run_dir: Path, report: dict) -> None:
    atomic_write_text(run_dir / REPORT, json.dumps(report, indent=2, default=str) + "\n")


def _busy(run_dir: Path) -> ShrinkError:
    return ShrinkError(f"'{run_dir}' holds a run already; add --resume to continue it, or choose another --output.")


def check_free(run_dir: Path) -> None:
    """Refuse a run directory that holds a run, before any planning writes into it."""
    if read_report(run_dir) is not None:
        raise _busy(run_dir)


def run_recipe(model: str, steps: list[tuple[str, Any]], run_dir: str | Path, *, resume: bool = False,
               data: str | None = None, seq_len: int = defaults.SEQ_LEN, hooks: Hooks | None = None,
               extra: dict | None = None, plan: dict | None = None) -> dict:
    """Execute `steps` on `model` in `run_dir`; returns the run report (also in run_dir/run.json).

    Raises StepFailed when a gate fails, ShrinkError on bad input; the report records either.
    `extra` (the planner's choice, say) is stored in the report as it is.
    """
    run_dir = Path(run_dir)
    recipe = [step_to_dict(name, config) for name, config in steps]
    report = read_report(run_dir)
    if report is not None and not resume:
        raise _busy(run_dir)
    if report is not None and (report["model"] != model or report["recipe"] != recipe):
        raise ShrinkError(f"The run in '{run_dir}' was started with another model or recipe; --resume continues "
                          "only the same run (choose another --output for a new one).")
    if report is None:
        report = {"model": model, "recipe": recipe, "steps": [], **(extra or {})}
    with directory_lock(run_dir):  # one run per directory; a killed run's lock is taken over
        remove_leftovers(run_dir)  # half-written files of a killed run (never read: not their real names)
        state = RunState(model=model, run_dir=run_dir, data=data, seq_len=seq_len, current=model, plan=plan,
                         hooks=hooks or Hooks())
        finished = [s for s in report["steps"] if s["status"] == "finished"]
        for record in finished:  # pick up where the finished steps left the model and the artifact
            state.current = record["outputs"].get("model", state.current)
            state.artifact = record["outputs"].get("artifact", state.artifact)
        report["steps"] = finished
        report["resumed"] = bool(finished) or report.get("resumed", False)
        for index in range(len(finished), len(steps)):
            name, config = steps[index]
            out = run_dir / f"{index + 1:02d}-{name}"
            record = {"name": name, "config": recipe[index], "status": "running",
                      "inputs": {"model": state.current, "artifact": state.artifact}, "started": time.time()}
            report["steps"].append(record)
            _write_report(run_dir, report)
            fault_point(f"step:{name}")
            state.hooks.step_started(index, name)
            began = time.perf_counter()
            try:
                record.update(EXECUTORS[name](state, config, out))
            except (StepFailed, ShrinkError) as err:
                record.update(status="failed", error=str(err), seconds=time.perf_counter() - began)
                _write_report(run_dir, report)
                raise
            record.update(status="finished", seconds=time.perf_counter() - began)
            state.current = record["outputs"].get("model", state.current)
            state.artifact = record["outputs"].get("artifact", state.artifact)
            _write_report(run_dir, report)
            state.hooks.step_finished(index, record)
        report["final"] = {"model": state.current, "artifact": state.artifact}
        _write_report(run_dir, report)
    return report


# --- `shrink run`: a run directory around run_recipe ---

def recipe_path(recipe: Path) -> Path:
    """A recipe file, or the file of a shipped recipe named by its stem (demo, minitron-width, ...)."""
    shipped = shipped_recipes()
    return shipped[str(recipe)] if not recipe.is_file() and str(recipe) in shipped else recipe


def resumed(run_dir: Path) -> tuple[list[tuple[str, Any]], dict | None] | None:
    """The steps and plan a run directory was started with (no re-planning on resume), or None."""
    saved = run_dir / "recipe.toml"
    if not saved.is_file():
        return None
    path = run_dir / PLAN_FILE
    return parse_recipe(saved), (json.loads(path.read_text()) if path.is_file() else None)


def execute(model: str, steps: list[tuple[str, Any]], run_dir: Path, *, resume: bool = False,
            data: str | None = None, seq_len: int = defaults.SEQ_LEN, plan: dict | None = None, recipe: Path | None = None,
            hooks: Hooks | None = None) -> dict:
    """Run `steps` in `run_dir` (recipe.toml and plan.json written first, so that --resume finds them),
    then cost the artifact on the plan's target and check the budget. Raises StepFailed on a failed gate."""
    saved = run_dir / "recipe.toml"
    existing = read_report(run_dir)
    if existing is not None and not resume:
        raise _busy(run_dir)
    refuse_early(model, steps)  # from the config alone, before the run directory or any weight
    done = sum(s["status"] == "finished" for s in existing["steps"]) if existing is not None else 0
    check_resources(run_needs(load_spec(model), steps, seq_len, done), run_dir, "This run")
    if existing is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if plan is not None and "recipe_toml" in plan:
            atomic_write_text(saved, plan["recipe_toml"])
        elif recipe is not None and recipe.resolve() != saved.resolve():
            shutil.copyfile(recipe, saved)
        if plan is not None:  # the plan, or a recipe's budget gate, outlives an interruption
            atomic_write_text(run_dir / PLAN_FILE, json.dumps({k: v for k, v in plan.items() if k != "recipe_toml"},
                                                              indent=2, default=str) + "\n")
    report = run_recipe(model, steps, run_dir, resume=resume, data=data, seq_len=seq_len, hooks=hooks,
                        extra={"plan": plan is not None}, plan=plan)
    estimated = artifact_estimate(report, plan) if plan is not None else None
    report["budget_check"] = budget_check(plan, report, estimated)
    report["run_dir"] = str(run_dir)
    if plan is not None:
        report["artifact_on_target"] = estimated
    if plan is not None and "chosen" in plan:
        report["planned"] = {k: plan[k] for k in ("target", "budget", "chosen", "why")}
    _write_report(run_dir, report)
    return report
