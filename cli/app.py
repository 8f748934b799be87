"""Entry point: the Typer app and the commands it carries.

A command's module is imported when that command runs (or when help lists the commands), so that one
command never pays for another's imports: `shrink estimate` reads a config without loading the training
and export stacks, and imports neither torch nor transformers (tests/test_light_imports.py holds this).
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from collections.abc import Iterator, Mapping

import click
import typer
from rich.logging import RichHandler
from typer.core import TyperGroup

from shrink import __version__
from shrink.allocator import map_large_allocations
from shrink.cli.render import err_console

# command -> (module, attribute): a command function, or a Typer app for a command with subcommands
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("shrink.cli.run", "run_command"),
    "inspect": ("shrink.cli.inspect", "inspect_command"),
    "estimate": ("shrink.cli.estimate", "estimate_command"),
    "formats": ("shrink.cli.formats", "formats_command"),
    "export": ("shrink.cli.export", "export_command"),
    "verify": ("shrink.cli.export", "verify_command"),
    "bench": ("shrink.cli.bench", "bench_command"),
    "generate": ("shrink.cli.export", "generate_command"),
    "prune": ("shrink.cli.prune", "prune_command"),
    "trim-vocab": ("shrink.cli.vocab", "trim_vocab_command"),
    "puzzle": ("shrink.cli.puzzle", "puzzle_command"),
    "kv-share": ("shrink.cli.kvshare", "kv_share_command"),
    "distill": ("shrink.cli.distill", "distill_command"),
    "quantize": ("shrink.cli.quantize", "quantize_command"),
    "profiles": ("shrink.cli.profiles", "profiles_app"),  # listed last, as Typer lists command groups
}


@functools.cache
def _command(name: str) -> click.Command:
    """The click command `name`, built from its module as `app.command` / `app.add_typer` would."""
    module, attribute = COMMANDS[name]
    target = getattr(importlib.import_module(module), attribute)
    holder = typer.Typer(add_completion=False, rich_markup_mode="rich")
    if isinstance(target, typer.Typer):
        holder.add_typer(target, name=name)
    else:
        holder.command(name)(target)
    return typer.main.get_group(holder).commands[name]


class _Commands(Mapping):
    """The commands by name: the names cost nothing, a command is built on its first lookup."""

    def __getitem__(self, name: str) -> click.Command:
        return _command(name)

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


class _LazyGroup(TyperGroup):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.commands = _Commands()

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(self.commands)  # names only: listing imports nothing


app = typer.Typer(
    name="shrink",
    cls=_LazyGroup,
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    help="Turn a causal language model into one that meets a deployment target, with evidence.\n\n"
    "Every figure shrink prints is labelled [bold]measured[/] (run here) or [bold]estimated[/] (roofline model).",
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"shrink {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what shrink is doing."),
) -> None:
    map_large_allocations()  # before any model is loaded: freed tensors then leave the process (allocator.py)
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
