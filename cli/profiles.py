"""`shrink profiles` and `shrink profiles show NAME`: the hardware targets and where their numbers come from."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.render import console, handle_user_errors, print_json
from shrink.errors import ShrinkError
from shrink.flows.calibrate import RUNTIMES, UNSTABLE_SPREAD, cache_host_kernels, calibrate_runtimes
from shrink.hardware.profiles import ALIASES, get_profile, known_targets, profile_toml
from shrink.storage import atomic_write_text

profiles_app = typer.Typer(
    help="List the hardware targets shrink can estimate for, or show one with the source of every number.",
    invoke_without_command=True,
    no_args_is_help=False,
)


@profiles_app.callback()
@handle_user_errors
def list_profiles(
    ctx: typer.Context,
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """List every target (built-in profiles and `host`, measured on this machine)."""
    if ctx.invoked_subcommand is not None:
        return
    profiles = [get_profile(name) for name in known_targets()]
    if json_out:
        print_json([p.to_dict() for p in profiles])
        return
    aliases = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    table = Table(title="Targets (use with --target; host is measured here, the others are published figures)", title_justify="left")
    table.add_column("name", no_wrap=True)  # typed back in --target: never cut
    for column in ("aliases", "device", "memory", "bandwidth", "peak dense compute (TFLOPS/TOPS)"):
        table.add_column(column)
    for p in profiles:
        peaks = ", ".join(f"{cls} {v:g}" for cls, v in p.peak_tflops.items())
        table.add_row(
            p.name, ", ".join(aliases.get(p.name, [])) or "-", p.title, f"{p.capacity_GB:g} GB",
            f"{p.bandwidth_GBps:g} GB/s" + (" (measured)" if p.measured else ""), peaks,
        )
    console.print(table)


@profiles_app.command("show")
@handle_user_errors
def show_profile(
    name: str = typer.Argument(..., help="A profile name or alias, 'host', or a path to a .toml profile."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    refresh: bool = typer.Option(False, "--refresh", help="For host: measure again instead of using the cache."),
) -> None:
    """Show one profile: every number, its source and the reasoning behind its efficiency factors."""
    profile = get_profile(name, refresh_host=refresh)
    if json_out:
        print_json(profile.to_dict())
        return
    label = "measured on this machine" if profile.measured else "published figures"
    table = Table(title=f"{profile.name}: {profile.title} ({label})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("kind", profile.kind)
    table.add_row("runtimes", ", ".join(profile.runtimes))
    table.add_row("memory", f"{profile.capacity_GB:g} GB, {profile.bandwidth_GBps:g} GB/s peak")
    for cls, value in profile.peak_tflops.items():
        table.add_row(f"peak {cls}", f"{value:g} {'TOPS' if cls.startswith('int') else 'TFLOPS'} dense")
    table.add_row("efficiency", f"bandwidth {profile.bandwidth_efficiency:g}, compute {profile.compute_efficiency:g}")
    for section, source in profile.sources.items():
        table.add_row(f"source: {section}", source)
    table.add_row("why these efficiencies", profile.reasoning)
    for runtime, kernels in profile.calibrations.items():
        rates = ", ".join(f"{fmt} {r.decode_GBps:.1f} GB/s / {r.prefill_TFLOPS * 1e3:.0f} GFLOP/s" for fmt, r in kernels.formats.items())
        table.add_row(f"{runtime} kernels (decode / prefill)", rates)
        table.add_row(f"{runtime} fixed costs", f"{kernels.decode_token_s * 1e6:.0f} us + {kernels.decode_layer_s * 1e6:.1f} us/layer "
                      f"per decode step; {kernels.prefill_call_s * 1e3:.2f} ms + {kernels.prefill_layer_s * 1e3:.3f} ms/layer per prefill")
        table.add_row(f"source: {runtime} kernels", kernels.source)
    if profile.path:
        table.add_row("file", profile.path)
    console.print(table)


@profiles_app.command("calibrate")
@handle_user_errors
def calibrate_profile(
    output: Path = typer.Option(None, "--output", "-o", help="Write the calibrated profile here (a .toml that --target takes); default: only cache it for --target host."),
    name: str = typer.Option(None, help="The profile's name in the file (default: the file's stem)."),
    runtime: str = typer.Option(",".join(RUNTIMES), help="Comma-separated runtimes to calibrate."),
    formats: str = typer.Option(None, help="Comma-separated formats to measure, with one --runtime (default: every format it stores: "
                                + "; ".join(f"{k.name}: {', '.join(k.formats)}" for k in RUNTIMES.values()) + ")."),
    threads: int = typer.Option(None, help="Threads the runtime uses (default: every CPU, as `shrink bench`)."),
    json_out: bool = typer.Option(False, "--json", help="Print the calibration as JSON on stdout."),
) -> None:
    """Measure llama.cpp's and ONNX Runtime's own kernels on this machine, per stored format, for estimates that match them.

    Times synthetic models (random weights) in every format as `shrink bench` does and fits per format the rate weights stream at in a decode step and the rate a prefill computes at, plus the fixed costs per token and per layer. The result is cached for `--target host`: `shrink estimate -t host`, `shrink bench` and `shrink run --target host` then cost each format with its own kernels. With -o it is also written as a profile file: run on a Jetson, a phone or a RISC-V board, that is the device's own profile.

    A calibration taken while other work runs is flagged and not cached. Minutes on 2 cores (each ONNX artifact is a trace).

    Examples:

      shrink profiles calibrate

      shrink profiles calibrate -o orin-nano-measured.toml && shrink estimate gemma-3-270m -t orin-nano-measured.toml
    """
    if output is not None and output.suffix != ".toml":
        raise ShrinkError(f"The profile file must end in .toml, not '{output.name}'.")
    runtimes = tuple(r.strip() for r in runtime.split(",") if r.strip())
    if formats and len(runtimes) != 1:
        raise ShrinkError("--formats names the formats of one runtime; give one --runtime with it.")
    chosen = tuple(f.strip().lower() for f in formats.split(",")) if formats else None
    host = get_profile("host", refresh_host=True)  # this machine's bandwidth and compute, measured now
    with console.status("calibrating") as spinner:
        calibrations = calibrate_runtimes(host, runtimes, threads=threads, formats=chosen,
                                          status=lambda message: spinner.update(message))
    # a partial calibration keeps the cached figures of the runtimes it did not measure, and does not
    # replace a runtime's complete cached calibration with fewer formats
    kept = [r for r in calibrations if not RUNTIMES[r].complete(calibrations[r]) and RUNTIMES[r].complete(host.calibration(r))]
    cached = not kept and cache_host_kernels({**host.calibrations, **calibrations})
    profile = replace(host, calibrations={**host.calibrations, **calibrations})
    if output is not None:
        stem = name or output.stem
        atomic_write_text(output, profile_toml(profile, stem, f"{host.title}, kernels calibrated"))
    why_not = (None if cached else f"the cache holds every format of {' and '.join(kept)}; calibrating without --formats "
               "replaces it" if kept else "other work ran during the calibration")
    if json_out:
        print_json({"runtime": {n: c.to_table() for n, c in calibrations.items()}, "cached": cached,
                    "not_cached_because": why_not, "output": str(output) if output else None,
                    "unstable": [n for n, c in calibrations.items() if c.spread > UNSTABLE_SPREAD]})
        return
    for runtime, calibration in calibrations.items():
        table = Table(title=f"{runtime} on this machine (measured; spread of repeated runs up to {calibration.spread:.1%})",
                      title_justify="left")
        for column in ("format", "decode: weights streamed", "+ per row", "prefill: compute", "+ per output"):
            table.add_column(column, justify="left" if column == "format" else "right")
        for fmt, rate in calibration.formats.items():
            table.add_row(fmt, f"{rate.decode_GBps:.2f} GB/s", f"{rate.decode_output_ns:.1f} ns",
                          f"{rate.prefill_TFLOPS * 1e3:.1f} GFLOP/s", f"{rate.prefill_output_ns:.2f} ns")
        console.print(table)
        console.print(f"fixed costs (measured): {calibration.decode_token_s * 1e6:.0f} us per decode step + "
                      f"{calibration.decode_layer_s * 1e6:.1f} us per layer; {calibration.prefill_call_s * 1e3:.2f} ms "
                      f"per prefill + {calibration.prefill_layer_s * 1e3:.3f} ms per layer", highlight=False)
        if calibration.spread > UNSTABLE_SPREAD:
            console.print(f"[yellow]warning[/]: {calibration.source.rsplit('; ', 1)[-1]}", highlight=False)
        if calibration.busy:
            console.print(f"[yellow]warning[/]: {calibration.source.rsplit('; ', 1)[-1]}; not cached: run it again "
                          "on a quiet machine", highlight=False)
    if cached:
        console.print("cached for --target host", highlight=False)
    elif kept:
        console.print(f"not cached: {why_not}", highlight=False)
    if output is not None:
        console.print(f"profile written to {output} (use it with --target {output})", highlight=False)

