"""Planning `shrink run MODEL --target T --budget X`: the candidates costed on the target, the quality
proxy measured here, the choice written as a recipe; then, after the run, the exported artifact itself
costed on the target and each budget line checked against it (or, on `host`, against its measured time).

The candidates, their costing and the quality proxy are flows/candidates.py's; this module composes
them, costs `host` candidates with the kernels calibrated here, and owns the plan's dictionary.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from shrink.compress.data import prepare
from shrink.compress.importance import cached_score
from shrink.errors import ShrinkError
from shrink.export.backend import artifact_costing, backend_for
from shrink.flows.calibrate import calibrated_host
from shrink.flows.candidates import (KV_TRANSFORMS, Candidate, TargetBudget, choose, closest, enumerate_candidates,
                                     hopeless, measure_proxies, no_plan_message, parse_workload, target_runtime)
from shrink.flows.anchors import anchor_candidates
from shrink.flows.gguf_quantize import quantizer_candidate
from shrink.flows.gguf_search import overrides_text
from shrink.flows.preflight import check_gguf_export
from shrink.flows import defaults
from shrink.flows.puzzle_plan import puzzle_candidates
from shrink.flows.recipe import (BenchStep, DistillStep, ExportStep, GGUFQuantizeStep, KVShareStep, PruneStep,
                                 PuzzleStep, QuantizeStep, SingleInputKVStep, VerifyStep, recipe_toml)
from shrink.flows.steps import Hooks
from shrink.hardware.calibration import calibrations_from_tables
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load, load_spec
from shrink.numformats import gate_for, get_format, stored_format
from shrink.units import fmt_bytes, fmt_time


class NoPlan(ShrinkError):
    """No candidate meets the budget; `closest` holds the nearest ones (as dictionaries) to show."""

    def __init__(self, message: str, closest: list[dict]) -> None:
        super().__init__(message)
        self.closest = closest


@dataclass(frozen=True)
class RunSettings:
    """What a planned recipe's steps train for."""
    distill_tokens: int = defaults.DISTILL_TOKENS
    qad_tokens: int = defaults.QAD_TOKENS  # 0: PTQ only
    calibration: str = defaults.CALIBRATION
    bench: bool = True


def recipe_for(candidate: Candidate, settings: RunSettings) -> list[tuple[str, Any]]:
    """The chosen candidate as recipe steps: prune and distill (when pruned), its K/V transform with its
    recovery (when it has one), quantize (when quantized), export to the target's runtime, verify, bench."""
    steps: list[tuple[str, Any]] = []
    if candidate.quantizer is not None:  # made by llama.cpp's quantizer: the step re-makes the measured file
        option = candidate.quantizer
        steps.append(("gguf-quantize", GGUFQuantizeStep(file_type=option["file_type"], imatrix=option["imatrix"],
                                                        overrides=overrides_text(option["overrides"]))))
        steps.append(("verify", verify_gate(candidate)))
        return steps + ([("bench", BenchStep())] if settings.bench else [])
    if candidate.axis == "puzzle":  # the step reads the planner's trained variants and scores, and chooses again
        steps.append(("puzzle", PuzzleStep(weights=candidate.format, export=candidate.runtime,
                                           work=str(candidate.shape.work))))
        steps.append(("distill", DistillStep(tokens=settings.distill_tokens)))
    elif candidate.shape is not None:
        steps.append(("prune", PruneStep(params=candidate.keep, axis=candidate.axis)))
        steps.append(("distill", DistillStep(tokens=settings.distill_tokens)))
    if candidate.kv == "kv-share":  # after pruning: its pairs are chosen among the layers kept
        steps.append(("kv-share", KVShareStep()))
        steps.append(("distill", DistillStep(tokens=settings.distill_tokens)))
    elif candidate.kv == "single-input-kv":  # SwiftKV's first stage is part of the step
        steps.append(("single-input-kv", SingleInputKVStep(tokens=settings.distill_tokens)))
    if candidate.format is not None:
        steps.append(("quantize", QuantizeStep(format=candidate.format, runtime=candidate.runtime,
                                               calibration=settings.calibration, qad=settings.qad_tokens > 0,
                                               tokens=max(settings.qad_tokens, 1))))
    steps.append(("export", ExportStep(format=candidate.runtime)))
    steps.append(("verify", verify_gate(candidate)))
    if settings.bench:
        steps.append(("bench", BenchStep()))
    return steps


def verify_gate(candidate: Candidate) -> VerifyStep:
    """What the planned artifact must keep of the original: the registry's gate for the format it stores
    (numformats/registry.py gives each bound's reason). A pruned candidate may also lose what its shape
    was measured to lose before recovery (the proxy's shape KL): added to the KL bound, top-1 not gated."""
    stored = (get_format(candidate.quantizer["weights"]) if candidate.quantizer is not None
              else stored_format(candidate.format, candidate.runtime))
    gate = gate_for(stored.name)
    if candidate.shape is None and candidate.kv is None:
        return VerifyStep(min_top1=gate.min_top1, max_kl=gate.max_kl, reason=f"registry gate of {stored.name}")
    parts = []
    if candidate.axis == "puzzle":
        parts.append(("the Puzzle architecture's", candidate.kl_shape or 0.0))
    elif candidate.shape is not None:
        parts.append((f"the {candidate.axis} {candidate.keep:.0%} shape's", candidate.kl_shape or 0.0))
    if candidate.kv is not None:
        parts.append((f"{KV_TRANSFORMS[candidate.kv]}'s", candidate.kl_kv or 0.0))
    allowance = sum(kl for _, kl in parts)
    return VerifyStep(min_top1=0.0, max_kl=round(gate.max_kl + allowance, 4),
                      reason=f"registry gate of {stored.name} + " + " + ".join(f"{what} measured KL {kl:.4f}"
                                                                            for what, kl in parts)
                             + " before distillation")


def gate(target: str, budget_texts: list[str], workload_text: str | None) -> dict:
    """A recipe run with a budget: the steps are the recipe's, the budget gates the result."""
    profile = get_profile(target)
    return {"target": profile.name, "target_title": profile.title, "budget": TargetBudget.parse(budget_texts).to_dict(),
            "workload": vars(parse_workload(workload_text)), "host_kernels": None}


HEADROOM_CAP = 0.10  # a machine noisier than this cannot be planned to within it: say so, do not plan for 40%


def with_headroom(budget: TargetBudget, profile: Any) -> tuple[TargetBudget, float]:
    """The budget the candidates are judged against. On a measured target the bench step's measurement
    decides the time line, and repeated runs on the machine differ by up to the spread its calibration
    recorded: a candidate predicted just under the budget would miss it about every other run, so the
    time line is judged that spread (at most HEADROOM_CAP) below the budget. Published targets: unchanged."""
    if not profile.measured or budget.tpot_s is None or not profile.calibrations:
        return budget, 0.0
    headroom = min(max(c.spread for c in profile.calibrations.values()), HEADROOM_CAP)
    return replace(budget, tpot_s=budget.tpot_s * (1 - headroom)), headroom


def plan(model: str, target: str, budget_texts: list[str], workload_text: str | None = None, *,
         proxy_steps: int = defaults.PROXY_STEPS, proxy_calibration: str | None = defaults.PROXY_CALIBRATION,
         data: str | None = None, seq_len: int = defaults.SEQ_LEN, settings: RunSettings | None = None,
         hooks: Hooks | None = None, puzzle_work: Path | None = None) -> dict:
    """The plan: every candidate costed, the chosen one, why, and its recipe (under "steps", and as
    TOML under "recipe_toml"). Raises NoPlan when no candidate meets the budget. With `puzzle_work`,
    Puzzle architectures are candidates too, their variants trained and scored there."""
    hooks = hooks or Hooks()
    settings = settings or RunSettings()
    proxy_calibration = proxy_calibration or settings.calibration  # as the executed quantize step calibrates
    profile = get_profile(target)
    budget = TargetBudget.parse(budget_texts)
    workload = parse_workload(workload_text)
    # the config alone, before any weight or text: a measured target (host) is costed with kernels
    # calibrated later, so only the published targets are refused this early
    # (Puzzle's no-op and linear blocks reach below every prune shape: with it, the full plan decides)
    early = None if profile.measured or puzzle_work else hopeless(load_spec(model), profile, workload, budget)
    if early is not None:
        raise NoPlan(early[0], [c.to_dict() for c in early[1]])
    if target_runtime(profile) == "gguf":  # a model llama.cpp cannot run is refused before any work
        check_gguf_export(model, tokenizer=True)
    hooks.status(f"Loading {model}")
    loaded = load(model)
    hooks.status("Preparing calibration and held-out text")
    split = prepare(loaded, data, seq_len=seq_len)
    hooks.status(f"Scoring importance on {split.calibration.numel():,} calibration tokens")
    importance = cached_score(loaded, split.calibration)
    if profile.measured:  # host: each format costed with the kernels of the runtime measured here
        profile = calibrated_host(hooks.status)
    asked = budget
    budget, headroom = with_headroom(asked, profile)
    candidates = enumerate_candidates(loaded, importance, profile, workload, budget)
    quantizer_missing = None  # why llama.cpp's quantizer offers no candidate
    if target_runtime(profile) == "gguf":  # llama.cpp's own quantizer, every option made and measured
        tuned, quantizer_missing, anchors = quantizer_candidate(loaded, split, profile, workload, budget, hooks.status)
        anchor_candidates(candidates, anchors, loaded.spec, budget)  # on host: the machine as it runs now
        candidates += [tuned] if tuned is not None else []
    puzzle_offer = None
    if puzzle_work is not None:
        found, puzzle_offer = puzzle_candidates(loaded, split, profile, workload, budget, puzzle_work, hooks)
        candidates += found
    if not any(c.fits for c in candidates):
        puzzle_said = f" Puzzle: {puzzle_offer['why']}." if puzzle_offer and "why" in puzzle_offer else ""
        raise NoPlan(no_plan_message(candidates, budget, profile) + puzzle_said + headroom_said(budget.tpot_s, headroom),
                     [c.to_dict() for c in closest(candidates, budget)])
    measure_proxies(candidates, model, importance, split, proxy_steps, proxy_calibration, hooks.status)
    chosen = choose(candidates)
    steps = recipe_for(chosen, settings)
    return {"model": model, "target": profile.name, "target_title": profile.title, "budget": asked.to_dict(),
            "planned_against": budget.to_dict(), "headroom": headroom, "workload": vars(workload),
            "proxy_steps": proxy_steps,
            "host_kernels": {n: c.to_table() for n, c in profile.calibrations.items()} if profile.measured else None,
            "proxy_calibration": proxy_calibration, "chosen": chosen.to_dict(), "puzzle": puzzle_offer,
            "llama_cpp_quantizer": {"why_none": quantizer_missing} if quantizer_missing else None,
            "why": why(chosen, candidates), "candidates": [c.to_dict() for c in candidates],
            "recipe_toml": recipe_toml(steps, f"planned for {profile.name} within {budget_text(asked)}"),
            "steps": steps}


def headroom_said(judged_tpot_s: float | None, headroom: float) -> str:
    """What a plan or its absence says about the headroom, if it took one."""
    if not headroom:
        return ""
    return (f" Candidates were judged against {fmt_time(judged_tpot_s)}/token: the budget less {headroom:.1%}, "
            f"the run-to-run spread this machine's calibration recorded, as its bench step's measurement decides.")


def pareto_points(plan: dict) -> list[dict]:
    """The plan's candidates as points for hardware/plot.pareto_chart."""
    return [{"label": c["label"], "tpot_s": c["tpot_s_estimated"], "kl": c["predicted_kl"],
             "fits": not c["misses"] and c["rejected"] is None, "chosen": c["label"] == plan["chosen"]["label"]}
            for c in plan["candidates"] if c["tpot_s_estimated"] is not None]  # one never costed has no point


def why(chosen: Candidate, candidates: list[Candidate]) -> str:
    fitting = [c for c in candidates if c.fits]
    faster = [c for c in fitting if c.tpot_s < chosen.tpot_s]
    text = (f"lowest predicted KL ({chosen.predicted_kl:.4f}: shape {chosen.kl_shape:.4f} + format "
            f"{chosen.kl_format:.4f}, measured) of the {len(fitting)} of {len(candidates)} candidates within budget")
    if faster:
        text += f"; {len(faster)} faster candidate(s) predict more loss"
    return text


def budget_text(budget: TargetBudget | dict) -> str:
    if isinstance(budget, dict):
        budget = TargetBudget(**budget)
    parts = []
    if budget.tpot_s is not None:
        parts.append(f"{fmt_time(budget.tpot_s)}/token")
    if budget.ttft_s is not None:
        parts.append(f"TTFT {fmt_time(budget.ttft_s)}")
    if budget.memory_bytes is not None:
        parts.append(f"memory {fmt_bytes(budget.memory_bytes)}")
    return ", ".join(parts)


# --- after the run ---

def planned_profile(plan: dict) -> Any:
    """The target as the plan costed it: on `host`, with the kernels calibrated then (a busy calibration
    is not cached, so the cache may not hold them)."""
    profile = get_profile(plan["target"])
    if plan.get("host_kernels"):
        profile = replace(profile, calibrations=calibrations_from_tables(plan["host_kernels"], "the plan"))
    return profile


def artifact_estimate(report: dict, plan: dict) -> dict | None:
    """The exported artifact itself (its stored tensor types) costed on the target."""
    artifact = report["final"]["artifact"]
    if artifact is None:
        return None
    spec, formats = artifact_costing(Path(artifact))
    if spec is None:
        return None
    est = estimate(spec.with_formats(**formats), planned_profile(plan), Workload(**plan["workload"]),
                   backend_for(Path(artifact)).runtime)
    # the roofline scaled by the anchor the plan chose the artifact with, if any
    chosen = plan.get("chosen") or {}
    anchor = chosen.get("anchor")
    estimated = est.tpot_s * (anchor["ratio"] if anchor else 1.0)
    # The plan's prediction: a file the quantizer search timed on this very target was chosen on that
    # measurement, so the measurement is what the plan predicted, not the roofline.
    cost = (chosen.get("quantizer") or {}).get("cost") or {}
    if cost.get("by") == "measured":
        predicted, predicted_by = cost["tpot_s"], "measured while planning"
    else:
        predicted, predicted_by = estimated, (f"estimated: roofline x {anchor['ratio']:.3f} ({anchor['label']})"
                                              if anchor else "estimated: roofline")
    return {"tpot_s_estimated": estimated, "tpot_s_roofline": est.tpot_s, "anchor": anchor,
            "tpot_s_predicted": predicted, "predicted_by": predicted_by,
            "ttft_s_estimated": est.ttft_s, "memory_bytes_estimated": est.memory.total_bytes,
            "kernels": est.runtime, "formats": formats}


def budget_check(plan: dict | None, report: dict, estimated: dict | None = None) -> dict:
    """Each budget line against the result: on `host` the measured decode time decides the per-token
    line; elsewhere, and for TTFT and memory, the exported artifact's own estimate on the target."""
    if plan is None:
        return {}
    budget, lines = plan["budget"], []
    estimated = estimated if estimated is not None else artifact_estimate(report, plan)
    bench = next((s["metrics"] for s in report["steps"] if s["name"] == "bench"), None)
    if budget.get("tpot_s") is not None:
        if plan["target"] == "host" and bench is not None:
            lines.append(("time per token", bench["measured"]["decode_s_per_token"], budget["tpot_s"], "measured"))
        elif estimated is not None:
            lines.append(("time per token", estimated["tpot_s_estimated"], budget["tpot_s"], "estimated"))
    if budget.get("ttft_s") is not None and estimated is not None:
        lines.append(("time to first token", estimated["ttft_s_estimated"], budget["ttft_s"], "estimated"))
    if budget.get("memory_bytes") is not None and estimated is not None:
        lines.append(("memory", estimated["memory_bytes_estimated"], budget["memory_bytes"], "estimated"))
    if not lines:
        return {}
    return {"passed": all(value <= limit for _, value, limit, _ in lines), "target": plan["target"],
            "lines": [{"what": what, "value": value, "budget": limit, "by": by, "passed": value <= limit}
                      for what, value, limit, by in lines]}

