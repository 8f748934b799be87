"""`shrink formats`: the format registry — what each stored format costs, how it is written, how verified."""

from __future__ import annotations

from dataclasses import asdict

import typer
from rich.table import Table

from shrink.cli.render import console, handle_user_errors, print_json
from shrink.numformats import FAMILIES, FORMATS


@handle_user_errors
def formats_command(json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout (every record, gates and their reasons included).")) -> None:
    """List the format registry: stored formats with their exact bits per weight (scales included), the
    runtime that writes them, the compute class they run in and the verify gate; then the families
    (`--format` of quantize, `--weights` of estimate) and what each runtime stores them as."""
    if json_out:
        print_json({"formats": [asdict(f) for f in FORMATS.values()],
                    "families": {name: family.stored for name, family in FAMILIES.items()}})
        return
    table = Table(title="Stored formats (--weights, --embeddings, --activations, --kv; verify gates)",
                  title_justify="left")
    for column in ("name", "runtime", "bits/weight", "computes as", "written as", "verify gate", "layout"):
        table.add_column(column, justify="right" if column == "bits/weight" else "left", no_wrap=column == "name")
    for f in FORMATS.values():
        written = f"GGUF {f.gguf_type}" if f.gguf_type else f.onnx_op or "-"
        gate = f"top-1 >= {f.gate.min_top1:.0%}, KL <= {f.gate.max_kl:g}" if f.gate and f.gate.min_top1 else "reported"
        table.add_row(f.name, f.runtime or "any", f"{f.bits_per_element:.4g}", f.compute, written, gate, f.description)
    console.print(table)
    families = Table(title="Families (--format; --weights resolves them for the target's runtime)", title_justify="left")
    for column in ("family", "gguf", "onnx", "torch", "what"):
        families.add_column(column)
    for name, family in FAMILIES.items():
        families.add_row(name, *(family.stored.get(r, "-") for r in ("gguf", "onnx", "torch")), family.description)
    console.print(families)
