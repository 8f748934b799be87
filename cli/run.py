"""`shrink run MODEL`: a recipe, or a plan chosen for a target and a budget, executed end to end.

With --recipe the steps are the file's. With --target and --budget the planner (flows/plan.py)
costs every candidate on the target, ranks those within budget by a measured quality proxy and
writes the winner as a recipe; then the run prunes, distils, quantizes, exports, verifies and times
the artifact in a run directory that `--resume` continues after an interruption (flows/run.py).
This module parses the options, calls the flows and renders their results.
"""

from __future__ import annotations

import re
from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, err_console, handle_user_errors, print_json
from shrink.units import fmt_bytes, fmt_time
from shrink.cli.training import cli_hooks
from shrink.errors import ShrinkError
from shrink.flows import defaults
from shrink.flows.plan import NoPlan, RunSettings, budget_text, gate, headroom_said, pareto_points
from shrink.flows.plan import plan as flows_plan
from shrink.flows.recipe import parse_recipe
from shrink.flows.run import StepFailed, check_free, execute, recipe_path, resumed
from shrink.hardware.plot import pareto_chart


@handle_user_errors
def run_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    recipe: Path = typer.Option(None, "--recipe", "-r", help="A TOML recipe file, or the name of a shipped one (demo, prune-qad-q4, minitron-width, qad-nvfp4); with --target/--budget the budget gates its result."),
    target: str = typer.Option(None, "--target", "-t", help="Hardware profile to plan for (see `shrink profiles`); `host` is this machine."),
    budget: list[str] = typer.Option(None, "--budget", "-b", help="20ms (per output token), ttft=200ms, mem=2GB; repeat or join with commas."),
    workload: str = typer.Option(None, help="batch=N,prompt=N,gen=N for the estimates (default batch=1,prompt=512,gen=128)."),
    output: Path = typer.Option(None, "--output", "-o", help="Run directory (default: runs/MODEL-TARGET or runs/MODEL-RECIPE)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --output after its last finished step."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Plan and print the estimates; prune, train and export nothing."),
    plot: Path = typer.Option(None, help="With --target: write a Pareto chart (predicted KL against estimated latency) to this .png/.svg/.pdf."),
    tokens: int = typer.Option(defaults.DISTILL_TOKENS, help="Planned runs: distillation tokens after pruning."),
    qad_tokens: int = typer.Option(defaults.QAD_TOKENS, help="Planned runs: QAD tokens after quantization (0: PTQ only)."),
    proxy_steps: int = typer.Option(defaults.PROXY_STEPS, help="Planner: distillation steps per prune shape within budget before its KL is measured (0: right after pruning, which misranks shapes that recover differently; each step of 4 x 128 tokens costs seconds for the embedded model on 2 cores)."),
    calibration: str = typer.Option(defaults.CALIBRATION, help="PTQ calibration of the quantize step: max, mse, awq or auto (awq for Llama-style decoders, else mse)."),
    proxy_calibration: str = typer.Option(defaults.PROXY_CALIBRATION, help="PTQ calibration behind the planner's format proxy; default: the quantize step's --calibration (max is instant, awq costs a minute or more per format)."),
    data: str = typer.Option(None, help="Text for calibration, training and held-out checks; default: text the model writes itself (cached)."),
    seq_len: int = typer.Option(defaults.SEQ_LEN, help="Tokens per sequence."),
    puzzle: bool = typer.Option(False, "--puzzle", help="Planner: weigh Puzzle architectures too (a variant per layer: pooled KV heads, narrower FFNs, linear maps, no-ops), each format's choice a candidate. Trains and scores every variant first (the embedded model: about 45 min on 2 cores), kept in the run directory for the run's puzzle step."),
    top: int = typer.Option(12, help="Planned runs: candidates shown, best first (within budget by predicted KL, then the rest by estimated time); 0 shows all. plan.json holds them all."),
    json_out: bool = typer.Option(False, "--json", help="Print the run report as JSON on stdout."),
) -> None:
    """Compose prune, distill, quantize, export, verify and bench into one run, from a recipe or a budget.

    With --target and --budget alone, the planner costs prune shapes times formats on the target.

    On llama.cpp targets it also runs llama.cpp's own quantizer: each file type, narrower vocabularies, layers on Q8_0.

    Each of those files is made and scored against the original (on `host` timed too), not predicted.

    The lowest KL within the budget becomes the recipe, which the run executes, verifies and times.

    Examples:

      shrink run gemma-3-270m --recipe demo --target jetson-orin-nano --budget 6ms

      shrink run gemma-3-270m --target jetson-orin-nano --budget 8ms --dry-run --plot pareto.png

      shrink run gemma-3-270m --target host --budget 13ms,mem=1GB -o runs/host

      shrink run gemma-3-270m --target h100-sxm --budget 0.5ms --puzzle -o runs/h100   # Puzzle among the candidates

      shrink run gemma-3-270m --target host --budget 13ms -o runs/host --resume   # after an interruption
    """
    if recipe is None and not resume and not (target and budget):
        raise ShrinkError("Say what to run: --recipe FILE, or --target T with --budget (e.g. --target jetson-orin-nano --budget 8ms).")
    if bool(target) != bool(budget):
        raise ShrinkError("--target and --budget go together: the budget is estimated on the target.")
    if puzzle and (recipe is not None or resume):
        raise ShrinkError("--puzzle widens the planner's search; a recipe names its own steps (add a 'puzzle' step to it), "
                          "and --resume continues the plan the run already has.")
    run_dir = output or Path("runs") / f"{Path(model).name}-{target or (recipe.stem if recipe else 'run')}"
    saved = resumed(run_dir) if resume else None
    if resume and saved is None and recipe is None and not target:
        raise ShrinkError(f"Nothing to resume in '{run_dir}': it holds no run started by shrink run; give --recipe, "
                          "or --target with --budget, to start one.")
    plan = None
    if saved is not None:
        steps, plan = saved  # the run's own steps: no re-planning on resume
    elif recipe is not None:
        recipe = recipe_path(recipe)
        steps = parse_recipe(recipe)
        if target:  # a recipe with a budget: the steps are the recipe's, the budget gates the result
            plan = gate(target, budget, workload)
    else:
        if puzzle:  # the planner trains into the run directory: a taken one is refused first, not after it
            check_free(run_dir)
        plan = _plan(model, target, budget, workload, plot, proxy_steps=proxy_steps,
                     proxy_calibration=proxy_calibration, data=data, seq_len=seq_len,
                     settings=RunSettings(tokens, qad_tokens, calibration),
                     puzzle_work=run_dir.resolve() / "puzzle-search" if puzzle else None)
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
    report = _execute(model, steps, run_dir, resume, data, seq_len, plan, recipe)
    if json_out:
        print_json(report)
    else:
        _print_report(report)
    if report.get("budget_check", {}).get("passed") is False:
        raise typer.Exit(1)


def _plan(model, target, budget_texts, workload_text, plot, **settings) -> dict:
    with Spinner() as spinner:
        try:
            plan = flows_plan(model, target, budget_texts, workload_text, hooks=cli_hooks(spinner), **settings)
        except NoPlan as err:
            spinner.stop()
            err_console.print(_candidates_table(err.closest, None, "Closest candidates (estimated)"))
            raise
    if plot is not None:
        pareto_chart(pareto_points(plan), plan["budget"]["tpot_s"],
                     f"{model} on {plan['target']}: candidates (estimated latency, proxy KL)", plot)
        plan["plot"] = str(plot)
    return plan


def _candidates_table(candidates: list[dict], chosen_label: str | None, title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column in ("candidate", "time/token (est.)", "TTFT (est.)", "memory (est.)", "predicted KL (proxy)", "verdict"):
        table.add_column(column, justify="left" if column in ("candidate", "verdict") else "right")
    for row in candidates:
        if row["rejected"]:
            verdict = "[grey50]not costed: " + _short(row["rejected"]) + "[/]"
        elif row["label"] == chosen_label:
            verdict = "[bold green]chosen[/]"
        elif row["misses"]:
            verdict = "[red]misses " + ", ".join(row["misses"]) + "[/]"
        else:
            verdict = "within budget"
        kl = row["predicted_kl"]
        costed = row["tpot_s_estimated"] is not None
        table.add_row(row["label"], fmt_time(row["tpot_s_estimated"]) if costed else "-",
                      fmt_time(row["ttft_s_estimated"]) if costed else "-",
                      fmt_bytes(row["memory_bytes_estimated"]) if costed else "-", "-" if kl is None else f"{kl:.4f}", verdict)
    return table


def _short(reason: str) -> str:
    """'rows of 640 do not divide into ternary_b256's 256-element blocks, ...' -> 'rows of 640 vs 256-blocks'."""
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
    kernels = plan.get("host_kernels") or {}
    console.print(f"[bold]Plan[/] for {plan['model']} on {plan['target']} ({plan['target_title']}) within "
                  f"{budget_text(plan['budget'])}; workload {plan['workload']}", highlight=False)
    if plan.get("headroom"):
        console.print(headroom_said(plan["planned_against"]["tpot_s"], plan["headroom"]).strip(), highlight=False)
    for runtime, table in kernels.items():
        console.print(f"host estimates use {runtime}'s kernels as calibrated here, per format ({table['source']})",
                      highlight=False)
    anchors = {c["anchor"]["label"]: c["anchor"] for c in plan["candidates"] if c.get("anchor")}
    if anchors:
        console.print("times of shrink's GGUF exports scaled by the files of this model measured now in the same "
                      "formats (measured / estimated): " + "; ".join(
                          f"{a['label']} {fmt_time(a['measured_s'])} / {fmt_time(a['estimated_s'])} = x{a['ratio']:.3f}"
                          for a in anchors.values()), highlight=False)
    ranked = _ranked(plan["candidates"], plan["chosen"]["label"])
    shown = ranked[:top] if top > 0 else ranked
    table = _candidates_table(shown, plan["chosen"]["label"],
                              "Candidates: roofline estimates on the target, quality proxy measured here")
    if len(shown) < len(ranked):
        table.caption = f"{len(shown)} of {len(ranked)} candidates shown, best first; --top 0 shows all, plan.json holds all"
    console.print(table)
    if (quantizer := plan.get("llama_cpp_quantizer")) is not None:
        console.print(f"llama.cpp's quantizer: {quantizer['why_none']}", highlight=False)
    offer = plan.get("puzzle")
    if offer and "why" in offer:
        console.print(f"Puzzle: {offer['why']}", highlight=False)
    console.print(f"chosen: [bold]{plan['chosen']['label']}[/], {plan['why']}", highlight=False)
    console.print(plan["recipe_toml"], highlight=False, markup=False)
    if plan.get("plot"):
        console.print(f"Pareto chart: {plan['plot']}")


def _execute(model, steps, run_dir, resume, data, seq_len, plan, recipe) -> dict:
    def started(index, name):
        spinner.stop()
        err_console.print(f"[bold]step {index + 1}/{len(steps)}: {name}[/]")

    def finished(index, record):
        spinner.stop()
        err_console.print(f"  {record['name']} finished in {record['seconds']:.0f} s (measured)")

    with Spinner() as spinner:
        hooks = cli_hooks(spinner, step_started=started, step_finished=finished)
        try:
            return execute(model, steps, run_dir, resume=resume, data=data, seq_len=seq_len, plan=plan, recipe=recipe,
                           hooks=hooks)
        except StepFailed as err:
            spinner.stop()
            err_console.print(f"[red]run stopped:[/] {err} (report: {run_dir / 'run.json'})")
            raise typer.Exit(1) from None


def _quantizer_table(metrics: dict) -> Table:
    """The gguf-quantize step's candidates: within the budget by KL first, then the others by time."""
    chosen = metrics["chosen"]["label"]
    table = Table(title="llama.cpp's quantizer: every candidate made, costed and scored (KL on held-out text)",
                  title_justify="left")
    for column in ("candidate", "time/token", "KL", "top-1", "verdict"):
        table.add_column(column, justify="left" if column in ("candidate", "verdict") else "right")
    ordered = sorted(metrics["candidates"], key=lambda o: (not o["fits"], o["kl"] if o["fits"] else o["cost"]["tpot_s"]))
    for option in ordered:
        verdict = ("[bold green]chosen[/]" if option["label"] == chosen else
                   "within budget" if option["fits"] else "[red]misses budget[/]")
        table.add_row(option["label"], f"{fmt_time(option['cost']['tpot_s'])} ({option['cost']['by'][:4]}.)",
                      f"{option['kl']:.4f}", f"{option['top1']:.1%}", verdict)
    return table


def _print_report(report: dict) -> None:
    for step in report["steps"]:
        if step["name"] == "gguf-quantize" and step.get("status") == "finished":
            console.print(_quantizer_table(step["metrics"]))
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
        on_target = report.get("artifact_on_target") or {}
        if on_target.get("tpot_s_predicted") is not None:  # the artifact as written, in the formats it stores
            console.print(f"predicted for the artifact on {planned['target']}: "
                          f"{fmt_time(on_target['tpot_s_predicted'])}/token ({on_target['predicted_by']})", highlight=False)
    bench = next((s["metrics"] for s in report["steps"] if s["name"] == "bench"), None)
    if bench is not None and bench.get("estimate"):
        console.print(f"on this machine: {fmt_time(bench['measured']['decode_s_per_token'])}/token measured, "
                      f"{fmt_time(bench['estimate']['tpot_s'])} estimated (host roofline"
                      + (f", {bench['estimate']['runtime']}'s kernels as calibrated here)" if bench["estimate"].get("runtime")
                         else ", no calibrated kernels)"), highlight=False)
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
    if name == "gguf-quantize":
        chosen = m["chosen"]
        return (f"{chosen['label']}: {fmt_time(chosen['cost']['tpot_s'])}/token ({chosen['cost']['by']}), held-out KL "
                f"{chosen['kl']:.4f}, {fmt_bytes(m['bytes_on_disk'])}; lowest KL within budget of "
                f"{len(m['candidates'])} candidates made by llama.cpp's quantizer")
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
