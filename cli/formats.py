"""`shrink formats`: the number formats shrink can cost, with their real storage per weight."""

from __future__ import annotations

import typer
from rich.table import Table

from shrink.cli.render import console, handle_user_errors, print_json


@handle_user_errors
def formats_command(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout.")) -> None:
    """List number formats: bits per weight with block scales included, and the compute class they run in."""
    from shrink.numformats import FORMATS

    if json_out:
        print_json([{"name": f.name, "bits_per_element": f.bits_per_element, "compute": f.compute,
                     "description": f.description} for f in FORMATS.values()])
        return
    table = Table(title="Number formats (use with --weights, --embeddings, --activations, --kv)", title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("bits/weight", justify="right")
    table.add_column("computes as")
    table.add_column("layout")
    for f in FORMATS.values():
        table.add_row(f.name, f"{f.bits_per_element:.4g}", f.compute, f.description)
    console.print(table)
