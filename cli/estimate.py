"""`shrink estimate MODEL --target T`: roofline latency and memory for a model on a target."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.numformats import resolve_weights, runtime_for
from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import console, err_console, handle_user_errors, print_json
from shrink.flows.calibrate import calibrated_host
from shrink.units import fmt_bytes, fmt_count, fmt_rate, fmt_time
from shrink.errors import ShrinkError
from shrink.hardware.plot import roofline_chart
from shrink.hardware.profiles import resolve_targets
from shrink.hardware.roofline import Estimate, Workload, estimate
from shrink.model import load_spec


@handle_user_errors
def estimate_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    target: str = typer.Option("all", "--target", "-t", help="A profile name (see `shrink profiles`), 'host', 'all', or a path to a .toml profile."),
    batch: int = typer.Option(1, help="Sequences decoded together."),
    prompt_len: int = typer.Option(512, help="Prompt tokens per sequence (prefill)."),
    gen_len: int = typer.Option(128, help="Generated tokens per sequence (decode)."),
    weights: str = typer.Option(None, help="Weight format of linear layers, e.g. bf16, fp8, int8, int4, nvfp4, q4_0 (default: the model's dtype; list: `shrink formats`)."),
    embeddings: str = typer.Option(None, help="Format of the embedding table and lm_head (default: the model's dtype)."),
    activations: str = typer.Option(None, help="Activation format (default: the model's dtype)."),
    kv: str = typer.Option(None, "--kv", help="KV-cache format, e.g. bf16, fp8, int8."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of tables."),
    plot: Path = typer.Option(None, "--plot", help="Write a roofline chart (PNG) of the target with the model's operators on it."),
    ops: bool = typer.Option(True, "--ops/--no-ops", help="Show the per-operator table (single target)."),
) -> None:
    """Estimate time to first token, time per output token, throughput and memory with a roofline model.

    Reads only the model's config: a 405B model estimates in a fraction of a second without weights.
    Every figure is an [bold]estimate[/]. Formats: `shrink formats`. Targets: `shrink profiles`.

    Examples:

      shrink estimate gemma-3-270m

      shrink estimate llama-3.1-405b -t h100 --weights fp8 --kv fp8 --batch 8

      shrink estimate gemma-3-270m -t orin-nano --weights q4_0 --plot r.png
    """
    workload = Workload(batch=batch, prompt_len=prompt_len, gen_len=gen_len)
    if plot is not None and target == "all":
        raise ShrinkError("--plot draws one target's roofline; pass a single --target with it.")
    profiles = resolve_targets(target)
    if target == "host":  # this machine: its runtime's kernels calibrated (once, cached)
        with err_console.status("Calibrating") as spinner:
            profiles = [calibrated_host(lambda message: spinner.update(message))]
    spec = load_spec(model)
    changes = {k: v for k, v in dict(weights=weights, embeddings=embeddings, activations=activations, kv_cache=kv).items() if v}
    results = [estimate(_with_formats(spec, changes, profile), profile, workload) for profile in profiles]
    if plot is not None:
        roofline_chart(results[0], profiles[0], plot)
    if json_out:
        print_json({"model": model, "estimates": [r.to_dict() for r in results]})
        return
    if len(results) == 1:
        e = results[0]
        console.print(f"[bold]Estimated (roofline)[/]: {e.model} on {e.target} ({e.target_title})", highlight=False)
        console.print(_header(e), highlight=False)
        kernels = profiles[0].calibration(e.runtime)
        if kernels is not None:
            console.print(f"costed with {kernels.runtime}'s kernels per format, measured ({kernels.source})", highlight=False)
        console.print(_summary_table(e))
        if ops:
            console.print(_ops_table(results[0]))
    else:
        console.print(_comparison_table(model, results))
    if plot is not None:
        console.print(f"Roofline chart written to {plot}")


def _header(e: Estimate) -> str:
    w, f = e.workload, e.formats
    return (
        f"batch {w.batch}, prompt {w.prompt_len}, generate {w.gen_len}; "
        f"weights {f['weights']}, embeddings {f['embeddings']}, activations {f['activations']}, KV {f['kv_cache']}"
    )


def _summary_table(e: Estimate) -> Table:
    table = Table()
    table.add_column("metric")
    table.add_column("estimate", justify="right")
    table.add_column("bound / note")
    m = e.memory
    table.add_row("time to first token", fmt_time(e.ttft_s), f"{e.prefill.bound}-bound")
    table.add_row("time per output token", fmt_time(e.tpot_s), f"{e.decode.bound}-bound")
    table.add_row("decode throughput", fmt_rate(e.decode_tokens_per_s, "tok"), f"batch {e.workload.batch}")
    table.add_row("prefill throughput", fmt_rate(e.prefill_tokens_per_s, "tok"), "")
    table.add_row("weights", fmt_bytes(m.weights_bytes), "scales included")
    table.add_row("KV cache", fmt_bytes(m.kv_cache_bytes), "at full context, windows respected")
    if m.ssm_state_bytes:
        table.add_row("SSM state", fmt_bytes(m.ssm_state_bytes), "")
    table.add_row("activations", fmt_bytes(m.activation_bytes), "prefill peak, rough")
    verdict = "[green]fits[/]" if m.fits else "[red]does not fit[/]"
    table.add_row("memory needed", fmt_bytes(m.total_bytes), f"{verdict} in {fmt_bytes(m.capacity_bytes)}")
    return table


def _ops_table(e: Estimate) -> Table:
    table = Table(title="Per operator (estimated); decode is one step, averaged over the generated tokens", title_justify="left")
    table.add_column("operator", no_wrap=True)
    for column, justify in (
        ("n", "right"), ("class", "left"), ("prefill", "right"), ("bound", "left"),
        ("decode", "right"), ("bytes/step", "right"), ("FLOPs/step", "right"), ("bound", "left"),
    ):
        table.add_column(column, justify=justify)
    decode = {op.name: op for op in e.decode.ops}
    for p in e.prefill.ops:
        d = decode[p.name]
        table.add_row(
            p.name, str(p.count), p.compute_class, fmt_time(p.time_s), p.bound,
            fmt_time(d.time_s), fmt_bytes(d.bytes), fmt_count(d.flops), d.bound,
        )
    table.add_row("total", "", "", fmt_time(e.prefill.time_s), e.prefill.bound, fmt_time(e.decode.time_s),
                  fmt_bytes(e.decode.bytes), fmt_count(e.decode.flops), e.decode.bound, style="bold")
    return table


def _comparison_table(model: str, results: list[Estimate]) -> Table:
    console.print(f"[bold]Estimated (roofline)[/]: {model} on every target", highlight=False)
    console.print(_header(results[0]), highlight=False)
    table = Table()
    table.add_column("target", no_wrap=True)  # names are typed back in --target: never cut them
    for column, justify in (
        ("time to first token", "right"), ("time per token", "right"),
        ("decode tok/s", "right"), ("memory needed", "right"), ("fits", "left"), ("bound (prefill / decode)", "left"),
    ):
        table.add_column(column, justify=justify)
    for e in results:
        fits = "[green]yes[/]" if e.memory.fits else f"[red]no[/] ({fmt_bytes(e.memory.capacity_bytes)})"
        table.add_row(
            e.target, fmt_time(e.ttft_s), fmt_time(e.tpot_s), f"{e.decode_tokens_per_s:,.1f}",
            fmt_bytes(e.memory.total_bytes), fits, f"{e.prefill.bound} / {e.decode.bound}",
        )
    return table


def _with_formats(spec, changes: dict, profile):
    """The spec in the formats asked for; a family (int4, nvfp4...) given for weights or embeddings is
    stored as the target's runtime stores it (int4 on llama.cpp: q4_0, the grid `shrink quantize` writes)."""
    runtime = runtime_for(profile.runtimes)
    resolved = {k: resolve_weights(v, runtime).name if k in ("weights", "embeddings") else v for k, v in changes.items()}
    return spec.with_formats(**resolved) if resolved else spec
