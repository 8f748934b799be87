"""Entry point: the Typer app and the commands it carries.

Command modules import only typer, rich and light shrink modules at import time; whatever needs torch
or transformers is imported inside the command that uses it, so that `shrink estimate` and the other
config-only commands start in a fraction of a second (tests/test_light_imports.py holds this).
"""

from __future__ import annotations

import logging
import os
import sys

import typer

from shrink import __version__
from shrink.cli.bench import bench_command
from shrink.cli.distill import distill_command
from shrink.cli.estimate import estimate_command
from shrink.cli.export import export_command, generate_command, verify_command
from shrink.cli.formats import formats_command
from shrink.cli.inspect import inspect_command
from shrink.cli.profiles import profiles_app
from shrink.cli.prune import prune_command
from shrink.cli.quantize import quantize_command
from shrink.cli.run import run_command

app = typer.Typer(
    name="shrink",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Turn a causal language model into one that meets a deployment target, with evidence.\n\n"
    "Every figure shrink prints is labelled [bold]measured[/] (run here) or [bold]estimated[/] (roofline model).",
)
app.command("run")(run_command)
app.command("inspect")(inspect_command)
app.command("estimate")(estimate_command)
app.add_typer(profiles_app, name="profiles")
app.command("formats")(formats_command)
app.command("export")(export_command)
app.command("verify")(verify_command)
app.command("bench")(bench_command)
app.command("generate")(generate_command)
app.command("prune")(prune_command)
app.command("distill")(distill_command)
app.command("quantize")(quantize_command)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shrink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what shrink is doing."),
) -> None:
    from rich.logging import RichHandler

    from shrink.cli.render import err_console

    handler = RichHandler(console=err_console, show_path=False, show_time=False)
    logging.basicConfig(level=logging.WARNING, handlers=[handler], format="%(message)s", force=True)
    # Progress on one-off slow work (converting the embedded model) is worth showing by default.
    logging.getLogger("shrink").setLevel(logging.DEBUG if verbose else logging.INFO)
    # The hub client logs every retry; shrink reports the outcome in one sentence instead.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    # shrink shows its own status; the hub's per-file and transformers' per-tensor bars are noise here.
    # Both read this variable when they are imported, which config-only commands never do.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:  # already imported (in-process callers such as tests): no cost
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def main() -> None:
    app()
