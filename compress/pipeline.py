"""Executing a recipe: each step in turn on the output of the one before, in a run directory.

    run_dir/
      recipe.toml        the steps (written by the planner, or copied from --recipe)
      run.json           the run report: per step its config, inputs, outputs, metrics, time, status
      01-prune/          each step's output (a model directory, an artifact, checkpoints)
      02-distill/ ...

run.json is rewritten (atomically) whenever a step starts, finishes or fails, so a killed run leaves
a report that says how far it got, and `resume=True` skips the finished steps and restarts the
interrupted one (a distillation continues from its last checkpoint). The teacher, the verify
reference and the data are always the original model's.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from shrink.compress.recipe import step_to_dict
from shrink.errors import ShrinkError

REPORT = "run.json"


class StepFailed(Exception):
    """A step ran but its result failed a gate (verification); the run stops with exit code 1."""


@dataclass
class Hooks:
    """How a run talks to its caller: status lines, the distillation runner, step boundaries."""
    status: Callable[[str], None] = lambda message: None
    train: Callable[..., Any] | None = None  # (model, split, train_topk, eval_topk, config, checkpoints, label=)
    step_started: Callable[[int, str], None] = lambda index, name: None
    step_finished: Callable[[int, dict], None] = lambda index, record: None


@dataclass
class RunState:
    model: str  # the original model: teacher, data source and verify reference
    run_dir: Path
    data: str | None = None
    seq_len: int = 128
    current: str = ""  # the model the next step starts from
    artifact: str | None = None  # the last exported artifact
    hooks: Hooks = field(default_factory=Hooks)
    _teacher: Any = None
    _split: Any = None

    def teacher(self) -> Any:
        if self._teacher is None:
            from shrink.model import load

            self.hooks.status(f"Loading {self.model}")
            self._teacher = load(self.model)
        return self._teacher

    def split(self) -> Any:
        if self._split is None:
            from shrink.compress.data import prepare

            self.hooks.status("Preparing the calibration, training and held-out text")
            self._split = prepare(self.teacher(), self.data, seq_len=self.seq_len)
        return self._split

    def student(self) -> Any:
        from shrink.model import load

        return load(self.current)  # a fresh copy: steps change models in place

    def teacher_topk(self, part: str) -> Any:
        from shrink.compress.distill.teacher import teacher_topk

        self.hooks.status("Teacher top-k logits (cached on disk after the first run)")
        return teacher_topk(self.teacher().model, getattr(self.split(), part))

    def train(self, *args: Any, **kwargs: Any) -> Any:
        if self.hooks.train is not None:
            return self.hooks.train(*args, **kwargs)
        from shrink.compress.quant.run import plain_train

        return plain_train(*args, **kwargs)


# --- the steps: each takes the state and its config, writes into `out`, returns its record ---

def _evaluate(state: RunState, model: Any) -> dict:
    from shrink.compress.distill.evaluate import evaluate

    return evaluate(model, state.split().evaluation, *state.teacher_topk("evaluation")).to_dict()


def _save(loaded: Any, out: Path) -> str:
    from shrink.model import save_loaded

    save_loaded(loaded, out)
    return str(out)


def prune_step(state: RunState, config: Any, out: Path) -> dict:
    from shrink.compress.importance import cached_score
    from shrink.compress.pruning import prune_to_budget, prune_to_sizes
    from shrink.compress.search import Budget

    sizes = {"ffn": config.ffn, "heads": config.heads, "hidden": config.hidden, "layers": config.layers}
    given = {k: v for k, v in sizes.items() if v is not None}
    if (config.params is None) == (not given):
        raise ShrinkError("A prune step takes either params (a fraction to keep) or sizes (ffn, heads, hidden, layers).")
    loaded = state.student()
    split = state.split()
    state.hooks.status(f"Scoring importance on {split.calibration.numel():,} calibration tokens")
    importance = cached_score(loaded, split.calibration)
    before = loaded.spec.param_counts().total
    if config.params is not None:
        pruned, report = prune_to_budget(loaded, importance, split, Budget(params=config.params), config.axis,
                                         config.search, status=state.hooks.status)
    else:
        pruned, report = prune_to_sizes(loaded, importance, **given), {"chosen": given, "chosen_by": "sizes given"}
    metrics = {"params_before": before, "params_after": pruned.spec.param_counts().total,
               "shape": report["chosen"], "chosen_by": report["chosen_by"],
               "held_out_after_pruning": _evaluate(state, pruned.model)}
    return {"outputs": {"model": _save(pruned, out)}, "metrics": metrics}


def distill_step(state: RunState, config: Any, out: Path) -> dict:
    from dataclasses import asdict

    from shrink.compress.distill.trainer import DistillConfig

    steps = max(1, config.tokens // (config.batch_size * state.seq_len))
    settings = DistillConfig(loss=config.loss, lr=config.lr, batch_size=config.batch_size, steps=steps,
                             checkpoint_every=max(1, steps // 8))
    settings.check()
    student = state.student()
    train_topk, eval_topk = state.teacher_topk("train"), state.teacher_topk("evaluation")
    report = state.train(student.model, state.split(), train_topk, eval_topk, settings,
                         Path(f"{out}.checkpoints"), label="distilling")
    path = _save(student, out)
    shutil.rmtree(f"{out}.checkpoints", ignore_errors=True)  # the step is done: the model is the result
    return {"outputs": {"model": path}, "metrics": {k: v for k, v in asdict(report).items() if k != "history"}}


def quantize_step(state: RunState, config: Any, out: Path) -> dict:
    from shrink.compress.quant.run import QuantizeSettings, quantize_model

    settings = QuantizeSettings(format=config.format, runtime=config.runtime, calibration=config.calibration,
                                qad=config.qad, tokens=config.tokens, lr=config.lr)
    student = state.student()
    report = quantize_model(student, state.teacher(), state.split(), settings, Path(f"{out}.checkpoints"),
                            train=state.train, status=state.hooks.status)
    path = _save(student, out)
    shutil.rmtree(f"{out}.checkpoints", ignore_errors=True)
    report["fallbacks"] = len(report["fallbacks"])  # the per-tensor list is in the model's plan
    report["kept_high_precision"] = len(report["kept_high_precision"])
    return {"outputs": {"model": path}, "metrics": report}


def export_step(state: RunState, config: Any, out: Path) -> dict:
    from shrink.export.workflow import export_artifact

    loaded = state.student()
    artifact = out / ("model.gguf" if config.format == "gguf" else "onnx")
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
    from shrink.export.workflow import verify_artifact

    state.hooks.status(f"Verifying the artifact against {state.model}")
    # The per-format defaults of `shrink verify` judge an export's fidelity; a compressed model is
    # judged against the original only by the gates the recipe sets (the metrics are always recorded).
    gated = config.min_top1 is not None or config.max_kl is not None
    verdict = verify_artifact(_artifact(state), state.model,
                              min_top1=config.min_top1 if config.min_top1 is not None else 0.0,
                              max_kl=config.max_kl if config.max_kl is not None else float("inf"))
    record = {"outputs": {}, "metrics": {**verdict.to_dict(), "gated": gated}}
    if not verdict.passed:
        raise StepFailed(f"the artifact fails verification against {state.model}: "
                         + "; ".join(c.detail for c in verdict.checks if not c.passed))
    return record


def bench_step(state: RunState, config: Any, out: Path) -> dict:
    from shrink.export.bench import bench

    state.hooks.status("Timing the artifact in its runtime on this machine")
    result = bench(_artifact(state), config.threads, config.prompt_len, config.gen_len, config.repeats)
    return {"outputs": {}, "metrics": result.to_dict()}


def _artifact(state: RunState) -> str:
    if state.artifact is None:
        raise ShrinkError("A verify or bench step needs an export step before it.")
    return state.artifact


EXECUTORS: dict[str, Callable[[RunState, Any, Path], dict]] = {
    "prune": prune_step, "distill": distill_step, "quantize": quantize_step, "export": export_step,
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
    from shrink.storage import atomic_write_text

    atomic_write_text(run_dir / REPORT, json.dumps(report, indent=2, default=str) + "\n")


def run_recipe(model: str, steps: list[tuple[str, Any]], run_dir: str | Path, *, resume: bool = False,
               data: str | None = None, seq_len: int = 128, hooks: Hooks | None = None,
               extra: dict | None = None) -> dict:
    """Execute `steps` on `model` in `run_dir`; returns the run report (also in run_dir/run.json).

    Raises StepFailed when a gate fails, ShrinkError on bad input; the report records either.
    `extra` (the planner's choice, say) is stored in the report as it is.
    """
    run_dir = Path(run_dir)
    recipe = [step_to_dict(name, config) for name, config in steps]
    report = read_report(run_dir)
    if report is not None and not resume:
        raise ShrinkError(f"'{run_dir}' holds a run already; add --resume to continue it, or choose another --output.")
    if report is not None and (report["model"] != model or report["recipe"] != recipe):
        raise ShrinkError(f"The run in '{run_dir}' was started with another model or recipe; --resume continues "
                          "only the same run (choose another --output for a new one).")
    if report is None:
        report = {"model": model, "recipe": recipe, "steps": [], **(extra or {})}
    run_dir.mkdir(parents=True, exist_ok=True)
    state = RunState(model=model, run_dir=run_dir, data=data, seq_len=seq_len, current=model,
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
