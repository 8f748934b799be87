"""`shrink bench ARTIFACT`: measured speed in the artifact's runtime, beside the host estimate."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.render import console, err_console, handle_user_errors, print_json
from shrink.units import fmt_time
from shrink.export.bench import bench
from shrink.flows import defaults


@handle_user_errors
def bench_command(
    artifact: Path = typer.Argument(..., help="A .gguf file or an ONNX directory written by `shrink export`."),
    threads: int = typer.Option(None, help="Runtime threads (default: all cores)."),
    prompt_len: int = typer.Option(defaults.BENCH_PROMPT_LEN, help="Prompt tokens (prefill)."),
    gen_len: int = typer.Option(defaults.BENCH_GEN_LEN, help="Decoded tokens per run."),
    repeats: int = typer.Option(defaults.BENCH_REPEATS, help="Timed runs after one warm-up run."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Measure prefill and per-token decode time here (median and spread), next to the roofline estimate for `host`.

    The estimate needs the manifest `shrink export` writes beside the artifact; without it only measurements are shown.
    """
    with err_console.status(f"Benchmarking {artifact} ({repeats} runs after a warm-up)"):
        result = bench(artifact, threads, prompt_len=prompt_len, gen_len=gen_len, repeats=repeats)
    if json_out:
        print_json(result.to_dict())
        return
    console.print(f"[bold]Bench[/] {artifact} in {result.runtime}, {result.threads} threads, prompt {prompt_len}, "
                  f"{gen_len} decoded tokens, {repeats} runs", highlight=False)
    table = Table()
    for column in ("figure", "measured (median, spread)", "estimated (roofline, host)", "measured / estimated"):
        table.add_column(column, justify="left" if column == "figure" else "right")
    e, p, d = result.estimate, result.prefill, result.decode
    table.add_row("prefill time", f"{fmt_time(p.median_s)} ({fmt_time(p.min_s)}-{fmt_time(p.max_s)})",
                  fmt_time(e.ttft_s) if e else "-", f"{p.median_s / e.ttft_s:.2f}x" if e else "-")
    table.add_row("prefill tokens/s", f"{result.prefill_tokens_per_s:,.0f}", f"{e.prefill_tokens_per_s:,.0f}" if e else "-", "")
    table.add_row("decode time per token", f"{fmt_time(d.median_s)} (IQR {fmt_time(d.q1_s)}-{fmt_time(d.q3_s)})",
                  fmt_time(e.tpot_s) if e else "-", f"{d.median_s / e.tpot_s:.2f}x" if e else "-")
    table.add_row("decode tokens/s", f"{1 / d.median_s:,.1f}", f"{e.decode_tokens_per_s:,.1f}" if e else "-", "")
    console.print(table)
    if e is None:
        console.print("[yellow]no manifest beside the artifact: no estimate to compare with[/]")
    elif e.runtime is None:
        console.print(f"the estimate uses this machine's bandwidth and compute, not {result.runtime}'s own kernels: "
                      "`shrink profiles calibrate` measures those (once) for estimates that match", highlight=False)
    else:
        console.print(f"the estimate uses {e.runtime}'s kernels per format as calibrated on this machine", highlight=False)
