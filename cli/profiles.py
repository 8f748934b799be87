"""`shrink profiles` and `shrink profiles show NAME`: the hardware targets and where their numbers come from."""

from __future__ import annotations

import typer
from rich.table import Table

from shrink.cli.render import console, handle_user_errors, print_json
from shrink.hardware.profiles import ALIASES, get_profile, known_targets

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
    if profile.path:
        table.add_row("file", profile.path)
    console.print(table)
