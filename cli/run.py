"""`shrink run MODEL`: a recipe, or a plan chosen for a target and a budget, executed end to end.

With --recipe the steps are the file's. With --target and --budget the planner (compress/planner.py)
costs every candidate on the target, ranks those within budget by a measured quality proxy and
writes the winner as a recipe; then the run prunes, distils, quantizes, exports, verifies and times
the artifact in a run directory that `--resume` continues after an interruption.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, err_console, fmt_bytes, fmt_time, handle_user_errors, print_json
from shrink.cli.training import run_distillation, spinner_paused

PLAN_FILE = "plan.json"


@handle_user_errors
def run_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="A TOML recipe file, or the name of a shipped one (demo, minitron-width, qad-nvfp4); with --target/--budget the budget gates its result."),
    target: str = typer.Option(None, "--target", "-t", help="Hardware profile to plan for (see `shrink profiles`); `host` is this machine."),
    budget: list[str] = typer.Option(None, "--budget", "-b", help="20ms (per output token), ttft=200ms, mem=2GB; repeat or join with commas."),
    workload: str = typer.Option(None, help="batch=N,prompt=N,gen=N for the estimates (default batch=1,prompt=512,gen=128)."),
    output: Path = typer.Option(None, "--output", "-o", help="Run directory (default: runs/MODEL-TARGET or runs/MODEL-RECIPE)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output after its last finished step."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and print the estimates; prune, train and export nothing."),
    plot: Path = typer.Option(None, help="With --target: write a Pareto chart (predicted KL against estimated latency) to this .png/.svg/.pdf."),
    tokens: int = typer.Option(12288, help="Planned runs: distillation tokens after pruning."),
    qad_tokens: int = typer.Option(6144, help="Planned runs: QAD tokens after quantization (0: PTQ only)."),
    proxy_steps: int = typer.Option(0, help="Planner: distillation steps per prune shape before its KL is measured (0: right after pruning; 4 ranks shapes closer to how they recover, at about 1.5 min per shape for the embedded model on 2 cores)."),
    calibration: str = typer.Option("auto", help="PTQ calibration of the quantize step: max, mse, awq or auto (awq for Llama-style decoders, else mse)."),
    proxy_calibration: str = typer.Option("max", help="PTQ calibration behind the planner's format proxy (max: instant; awq costs minutes per format)."),
    data: str = typer.Option(None, help="Text for calibration, training and held-out checks; default: text the model writes itself (cached)."),
    seq_len: int = typer.Option(128, help="Tokens per sequence."),
    top: int = typer.Option(12, help="Planned runs: candidates shown, best first (within budget by predicted KL, then the rest by estimated time); 0 shows all. plan.json holds them all."),
    json_out: bool = typer.Option(False, "--json", help="Print the run report as JSON on stdout."),
) -> None:
    """Compose prune, distill, quantize, export, verify and bench into one run, from a recipe or a budget.

    Examples:

      shrink run gemma-3-270m --recipe demo --target jetson-orin-nano --budget 6ms

      shrink run gemma-3-270m --target jetson-orin-nano --budget 8ms --dry-run --plot pareto.png

      shrink run gemma-3-270m --target host --budget 13ms,mem=1GB -o runs/host

      shrink run gemma-3-270m --target host --budget 13ms -o runs/host --resume   # after an interruption
    """
    from shrink.compress.planner import RunSettings
    from shrink.compress.recipe import parse_recipe
    from shrink.errors import ShrinkError

    if recipe is None and not resume and not (target and budget):
        raise ShrinkError("Say what to run: --recipe FILE, or --target T with --budget (e.g. --target jetson-orin-nano --budget 8ms).")
    if bool(target) != bool(budget):
        raise ShrinkError("--target and --budget go together: the budget is estimated on the target.")
    run_dir = output or Path("runs") / f"{Path(model).name}-{target or (recipe.stem if recipe else 'run')}"
    saved = run_dir / "recipe.toml"
    plan = None
    if resume and saved.is_file():
        steps = parse_recipe(saved)  # the run's own steps: no re-planning on resume
        plan = _read_plan(run_dir)
    elif recipe is not None:
        recipe = _recipe_path(recipe)
        steps = parse_recipe(recipe)
        if target:  # a recipe with a budget: the steps are the recipe's, the budget gates the result
            plan = _gate(target, budget, workload)
    else:
        plan = _plan(model, target, budget, workload, proxy_steps, proxy_calibration, data, seq_len,
                     RunSettings(tokens, qad_tokens, calibration), plot)
        steps = plan.pop("steps")
        if not json_out:
            _print_plan(plan, top)
        if dry_run:
            if json_out:
                print_json({k: v for k, v in plan.items() if k != "recipe_toml"})
            return
    if dry_run:
        console.print("\n".join(f"{i + 1}. {name}: {config}" for i, (name, config) in enumerate(steps)))
        return
    report = _execute(model, steps, run_dir, resume, data, seq_len, plan, recipe, saved)
    if json_out:
        print_json(report)
    else:
        _print_report(report)
    if report.get("budget_check", {}).get("passed") is False:
        raise typer.Exit(1)


def _recipe_path(recipe: Path) -> Path:
    from shrink.compress.recipe import shipped_recipes

    shipped = shipped_recipes()
    return shipped[str(recipe)] if not recipe.exists() and str(recipe) in shipped else recipe


def _gate(target, budget_texts, workload_text) -> dict:
    from shrink.compress.planner import TargetBudget, parse_workload
    from shrink.hardware.profiles import get_profile

    profile = get_profile(target)
    return {"target": profile.name, "target_title": profile.title, "budget": TargetBudget.parse(budget_texts).to_dict(),
            "workload": vars(parse_workload(workload_text)), "host_calibration": None}


def _plan(model, target, budget_texts, workload_text, proxy_steps, calibration, data, seq_len, settings, plot) -> dict:
    from shrink.compress.data import prepare
    from shrink.compress.importance import cached_score
    from shrink.compress.planner import (TargetBudget, choose, closest, enumerate_candidates, factor_pair,
                                         host_factors, measure_proxies, no_plan_message, parse_workload, recipe_for)
    from shrink.compress.recipe import recipe_toml
    from shrink.errors import ShrinkError
    from shrink.hardware.profiles import get_profile
    from shrink.model import load

    profile = get_profile(target)
    budget = TargetBudget.parse(budget_texts)
    workload = parse_workload(workload_text)
    with Spinner() as spinner:
        spinner.update(f"Loading {model}")
        loaded = load(model)
        spinner.update("Preparing calibration and held-out text")
        split = prepare(loaded, data, seq_len=seq_len)
        spinner.update(f"Scoring importance on {split.calibration.numel():,} calibration tokens")
        importance = cached_score(loaded, split.calibration)
        factors = host_factors(model, workload, spinner.update) if profile.measured else None
        candidates = enumerate_candidates(loaded, importance, profile, workload, budget, factor_pair(factors))
        if not any(c.fits for c in candidates):
            spinner.stop()
            err_console.print(_candidates_table(closest(candidates, budget), None, "Closest candidates (estimated)"))
            raise ShrinkError(no_plan_message(candidates, budget, profile))
        measure_proxies(candidates, model, importance, split, proxy_steps, calibration, spinner.update)
    chosen = choose(candidates)
    steps = recipe_for(chosen, settings)
    plan = {"model": model, "target": profile.name, "target_title": profile.title, "budget": budget.to_dict(),
            "workload": vars(workload), "host_calibration": factors, "proxy_steps": proxy_steps,
            "proxy_calibration": calibration, "chosen": chosen.to_dict(),
            "why": _why(chosen, candidates), "candidates": [c.to_dict() for c in candidates],
            "recipe_toml": recipe_toml(steps, f"planned for {profile.name} within {_budget_text(budget)}"),
            "steps": steps}
    if plot is not None:
        from shrink.hardware.plot import pareto_chart

        points = [{"label": c.label, "tpot_s": c.tpot_s, "kl": c.predicted_kl, "fits": c.fits, "chosen": c is chosen}
                  for c in candidates]
        pareto_chart(points, budget.tpot_s, f"{model} on {profile.name}: candidates (estimated latency, proxy KL)", plot)
        plan["plot"] = str(plot)
    return plan


def _why(chosen, candidates) -> str:
    fitting = [c for c in candidates if c.fits]
    faster = [c for c in fitting if c.tpot_s < chosen.tpot_s]
    text = (f"lowest predicted KL ({chosen.predicted_kl:.4f}: shape {chosen.kl_shape:.4f} + format "
            f"{chosen.kl_format:.4f}, measured) of the {len(fitting)} of {len(candidates)} candidates within budget")
    if faster:
        text += f"; {len(faster)} faster candidate(s) predict more loss"
    return text


def _budget_text(budget) -> str:
    parts = []
    if budget.tpot_s is not None:
        parts.append(f"{fmt_time(budget.tpot_s)}/token")
    if budget.ttft_s is not None:
        parts.append(f"TTFT {fmt_time(budget.ttft_s)}")
    if budget.memory_bytes is not None:
        parts.append(f"memory {fmt_bytes(budget.memory_bytes)}")
    return ", ".join(parts)


def _candidates_table(candidates, chosen_label, title) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("candidate", "time/token (est.)", "TTFT (est.)", "memory (est.)", "predicted KL (proxy)", "verdict"):
        table.add_column(column, justify="left" if column in ("candidate", "verdict") else "right")
    for c in candidates:
        label = c["label"] if isinstance(c, dict) else c.label
        row = c if isinstance(c, dict) else c.to_dict()
        if row["rejected"]:
            verdict = "[grey50]not costed: " + _short(row["rejected"]) + "[/]"
        elif label == chosen_label:
            verdict = "[bold green]chosen[/]"
        elif row["misses"]:
            verdict = "[red]misses " + ", ".join(row["misses"]) + "[/]"
        else:
            verdict = "within budget"
        kl = row["predicted_kl"]
        table.add_row(label, fmt_time(row["tpot_s_estimated"]), fmt_time(row["ttft_s_estimated"]),
                      fmt_bytes(row["memory_bytes_estimated"]), "-" if kl is None else f"{kl:.4f}", verdict)
    return table


def _short(reason: str) -> str:
    """'rows of 640 do not divide into ternary_b256's 256-element blocks, ...' -> 'rows of 640 vs 256-blocks'."""
    import re

    match = re.match(r"rows of (\d+) .* (\d+)-element blocks", reason)
    return f"rows of {match.group(1)} vs {match.group(2)}-blocks" if match else reason.split(",")[0]


def _ranked(candidates: list[dict], chosen_label: str) -> list[dict]:
    """Chosen first, then the others within budget by predicted KL, those that miss it by estimated
    time per token, and the ones that could not be costed last."""
    def key(c: dict) -> tuple:
        if c["label"] == chosen_label:
            return (0, 0.0)
        if c["rejected"]:
            return (3, 0.0)
        if c["misses"]:
            return (2, c["tpot_s_estimated"])
        return (1, c["predicted_kl"] if c["predicted_kl"] is not None else float("inf"))
    return sorted(candidates, key=key)


def _print_plan(plan: dict, top: int = 0) -> None:
    factors = plan.get("host_calibration")
    console.print(f"[bold]Plan[/] for {plan['model']} on {plan['target']} ({plan['target_title']}) within "
                  f"{_budget_text(_budget_of(plan))}; workload {plan['workload']}", highlight=False)
    if factors:
        console.print(f"host estimates scaled by measured/estimated {factors['decode']:.2f}x (decode) and "
                      f"{factors['prefill']:.2f}x (prefill): the original as F16 GGUF took "
                      f"{fmt_time(factors['measured_decode_s'])}/token measured against "
                      f"{fmt_time(factors['estimated_decode_s'])} estimated", highlight=False)
    ranked = _ranked(plan["candidates"], plan["chosen"]["label"])
    shown = ranked[:top] if top > 0 else ranked
    table = _candidates_table(shown, plan["chosen"]["label"],
                              "Candidates: roofline estimates on the target, quality proxy measured here")
    if len(shown) < len(ranked):
        table.caption = f"{len(shown)} of {len(ranked)} candidates shown, best first; --top 0 shows all, plan.json holds all"
    console.print(table)
    console.print(f"chosen: [bold]{plan['chosen']['label']}[/], {plan['why']}", highlight=False)
    console.print(plan["recipe_toml"], highlight=False, markup=False)
    if plan.get("plot"):
        console.print(f"Pareto chart: {plan['plot']}")


def _budget_of(plan: dict):
    from shrink.compress.planner import TargetBudget

    return TargetBudget(**plan["budget"])


def _read_plan(run_dir: Path) -> dict | None:
    import json

    path = run_dir / PLAN_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _execute(model, steps, run_dir, resume, data, seq_len, plan, recipe, saved) -> dict:
    import json
    import shutil

    from shrink.compress.pipeline import Hooks, read_report, run_recipe
    from shrink.storage import atomic_write_text

    existing = read_report(run_dir)
    if existing is not None and not resume:
        from shrink.errors import ShrinkError

        raise ShrinkError(f"'{run_dir}' holds a run already; add --resume to continue it, or choose another --output.")
    if existing is None:
        run_dir.mkdir(parents=True, exist_ok=True)
        if plan is not None and "recipe_toml" in plan:
            atomic_write_text(saved, plan["recipe_toml"])
        elif recipe is not None and recipe.resolve() != saved.resolve():
            shutil.copyfile(recipe, saved)
        if plan is not None:  # the plan, or a recipe's budget gate, outlives an interruption
            atomic_write_text(run_dir / PLAN_FILE, json.dumps({k: v for k, v in plan.items() if k != "recipe_toml"},
                                                              indent=2, default=str) + "\n")
    with Spinner() as spinner:
        hooks = Hooks(status=spinner.update, train=spinner_paused(spinner, run_distillation),
                      step_started=lambda i, name: (spinner.stop(), err_console.print(f"[bold]step {i + 1}/{len(steps)}: {name}[/]")),
                      step_finished=lambda i, record: (spinner.stop(), err_console.print(
                          f"  {record['name']} finished in {record['seconds']:.0f} s (measured)")))
        try:
            report = run_recipe(model, steps, run_dir, resume=resume, data=data, seq_len=seq_len, hooks=hooks,
                                extra={"plan": plan is not None})
        except Exception as err:
            from shrink.compress.pipeline import StepFailed

            if isinstance(err, StepFailed):
                spinner.stop()
                err_console.print(f"[red]run stopped:[/] {err} (report: {run_dir / 'run.json'})")
                raise typer.Exit(1) from None
            raise
    estimated = _artifact_estimate(report, plan) if plan is not None else None
    report["budget_check"] = _budget_check(plan, report, estimated)
    report["run_dir"] = str(run_dir)
    if plan is not None:
        report["artifact_on_target"] = estimated
    if plan is not None and "chosen" in plan:
        report["planned"] = {k: plan[k] for k in ("target", "budget", "chosen", "why")}
    atomic_write_text(run_dir / "run.json", json.dumps(report, indent=2, default=str) + "\n")
    return report


def _artifact_estimate(report: dict, plan: dict) -> dict | None:
    """The exported artifact itself (its stored tensor types) costed on the target."""
    from shrink.compress.planner import factor_pair
    from shrink.export.bench import artifact_costing
    from shrink.export.runtimes import artifact_kind
    from shrink.hardware.profiles import get_profile
    from shrink.hardware.roofline import Workload, estimate

    artifact = report["final"]["artifact"]
    if artifact is None:
        return None
    spec, formats = artifact_costing(Path(artifact), artifact_kind(Path(artifact)))
    if spec is None:
        return None
    est = estimate(spec.with_formats(**formats), get_profile(plan["target"]), Workload(**plan["workload"]))
    decode, prefill = factor_pair(plan.get("host_calibration"))
    return {"tpot_s_estimated": est.tpot_s * decode, "ttft_s_estimated": est.ttft_s * prefill,
            "memory_bytes_estimated": est.memory.total_bytes, "host_factors": [decode, prefill], "formats": formats}


def _budget_check(plan: dict | None, report: dict, estimated: dict | None = None) -> dict:
    """Each budget line against the result: on `host` the measured decode time decides the per-token
    line; elsewhere, and for TTFT and memory, the exported artifact's own estimate on the target."""
    if plan is None:
        return {}
    budget, lines = plan["budget"], []
    estimated = estimated if estimated is not None else _artifact_estimate(report, plan)
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


def _print_report(report: dict) -> None:
    table = Table(title=f"Run {report['run_dir']}: {report['model']}", title_justify="left")
    for column in ("step", "time (measured)", "result"):
        table.add_column(column)
    for s in report["steps"]:
        table.add_row(s["name"], f"{s.get('seconds', 0):.0f} s", _summary(s))
    console.print(table)
    planned = report.get("planned")
    if planned:
        console.print(f"plan: {planned['chosen']['label']} for {planned['target']}, chosen by {planned['why']}",
                      highlight=False)
        chosen = planned["chosen"]
        console.print(f"estimated on {planned['target']}: {fmt_time(chosen['tpot_s_estimated'])}/token, TTFT "
                      f"{fmt_time(chosen['ttft_s_estimated'])}, memory {fmt_bytes(chosen['memory_bytes_estimated'])}",
                      highlight=False)
    bench = next((s["metrics"] for s in report["steps"] if s["name"] == "bench"), None)
    if bench is not None and bench.get("estimate"):
        console.print(f"on this machine: {fmt_time(bench['measured']['decode_s_per_token'])}/token measured, "
                      f"{fmt_time(bench['estimate']['tpot_s'])} estimated (host roofline, uncalibrated)", highlight=False)
    check = report.get("budget_check") or {}
    for line in check.get("lines", []):
        mark = "[bold green]meets[/]" if line["passed"] else "[bold red]misses[/]"
        show = fmt_bytes if line["what"] == "memory" else fmt_time
        console.print(f"budget on {check['target']}: {line['what']} {show(line['value'])} ({line['by']}) {mark} "
                      f"{show(line['budget'])}", highlight=False)
    console.print(f"artifact: {report['final']['artifact']}; report: {report['run_dir']}/run.json")


def _summary(step: dict) -> str:
    m = step.get("metrics", {})
    name = step["name"]
    if name == "prune":
        kl = m["held_out_after_pruning"]["kl"]
        return f"{m['params_before']:,} -> {m['params_after']:,} parameters; KL {kl:.3f} right after pruning"
    if name == "distill":
        return (f"{m['tokens']:,} tokens; KL {m['eval_before']['kl']:.3f} -> {m['eval_after']['kl']:.3f}, "
                f"perplexity {m['eval_after']['perplexity']:.2f}")
    if name == "quantize":
        text = f"{m['grid']} ({m['effective_bits_per_quantized_weight']:.3f} bits); PTQ KL {m['ptq']['kl']:.3f}"
        if m.get("qad"):
            text += f" -> QAD KL {m['qad']['after']['kl']:.3f}"
            if m.get("kept") == "ptq":
                text += " (worse: PTQ weights kept)"
        return text
    if name == "export":
        verdict = m.get("verify_against_model") or {}
        metrics = verdict.get("metrics") or {}
        return (f"{fmt_bytes(m['bytes_on_disk'])} on disk; vs the model it came from: top-1 "
                f"{metrics.get('top1_agreement', float('nan')):.2%}, KL {metrics.get('mean_kl', float('nan')):.4f}")
    if name == "verify":
        metrics = m.get("metrics") or {}
        return (f"vs the original: top-1 {metrics.get('top1_agreement', float('nan')):.2%}, KL "
                f"{metrics.get('mean_kl', float('nan')):.4f}, perplexity {metrics.get('ppl_artifact', float('nan')):.2f}")
    if name == "bench":
        return (f"{fmt_time(m['measured']['decode_s_per_token'])}/token, "
                f"{m['measured']['prefill_tokens_per_s']:,.0f} prompt tok/s (measured, {m['threads']} threads)")
    return ""
