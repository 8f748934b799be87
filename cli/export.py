"""`shrink export` and `shrink verify`: artifacts for llama.cpp and ONNX Runtime, checked in them."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import console, err_console, handle_user_errors, print_json
from shrink.export.backend import backend
from shrink.export.generate import generate
from shrink.export.onnx import check_logits
from shrink.export.onnx_backend import OnnxBackend
from shrink.export.verify import junit_xml
from shrink.export.workflow import export_artifact, verify_artifact
from shrink.flows.preflight import check_gguf_export
from shrink.flows.resources import check as check_resources
from shrink.flows.resources import export_needs
from shrink.model import load, load_spec
from shrink.storage import atomic_write_text


@handle_user_errors
def export_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    fmt: str = typer.Option(..., "--format", "-f", help="gguf (llama.cpp) or onnx (ONNX Runtime)."),
    output: Path = typer.Option(..., "--output", "-o", help="The .gguf file, or the directory for ONNX."),
    quant: str = typer.Option(None, help="GGUF: f32, f16 (default), bf16, q8_0, q4_0, q4_1, q5_0, q5_1, tq1_0, tq2_0, mxfp4. ONNX: f32 (default), int8, int4."),
    block_size: int = typer.Option(OnnxBackend.default_block_size, help="ONNX int4/int8: weights per quantization block."),
    pad_to_uniform: bool = typer.Option(False, help="GGUF of a non-uniform model llama.cpp cannot shape per layer: zero-pad to the widest layer (same outputs, no speed gain)."),
    logits: str = typer.Option(None, help="ONNX: which positions' logits the graph returns: all (default; verify reads every position in one call) or last (a deployment's prefill: about half the time of 'all' at 2,048 tokens on Gemma 3 270M, measured; verify decodes token by token). A SingleInputKV model is always 'last'."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Run the artifact in its runtime against the model and record the metrics in the manifest."),
    prompts: Path = typer.Option(None, help="Text file for verification (blocks separated by blank lines); default: varied built-in text."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Export a model to GGUF or ONNX, verify it in its runtime, and write a manifest beside it.

    Exit code 0 when the artifact verifies, 1 when it was written but fails verification, 2 on bad input.

    Examples:

      shrink export gemma-3-270m -f gguf --quant q8_0 -o gemma-q8_0.gguf

      shrink export gemma-3-270m -f onnx -o gemma-onnx
    """
    backend(fmt).check_quant(quant, block_size)  # an unknown format, type or block size fails before the weights load
    check_logits(fmt, logits)
    if fmt == "gguf":
        check_gguf_export(model)  # what the config alone shows, before the weights load
    check_resources(export_needs(load_spec(model), fmt, quant), output, "This export")
    with err_console.status(f"Loading {model}"):
        loaded = load(model)
    with err_console.status(f"Exporting to {fmt} and verifying in its runtime"):
        result = export_artifact(loaded, fmt, output, quant=quant, pad_to_uniform=pad_to_uniform, verify=verify,
                                 prompts_file=str(prompts) if prompts else None, block_size=block_size, logits=logits)
    if json_out:
        print_json({"artifact": str(result.artifact), "manifest": str(result.manifest), "export": result.report,
                    "verify": result.verdict.to_dict() if result.verdict else None})
    else:
        _print_export(result)
    if result.verdict is not None and not result.verdict.passed:
        raise typer.Exit(1)


def _print_export(result) -> None:
    report = result.report
    size = sum(p.stat().st_size for p in ([result.artifact] if result.artifact.is_file() else result.artifact.rglob("*")) if p.is_file())
    console.print(f"[bold]Exported[/] {result.artifact} ({report['arch']}, {report['quant']}, {size / 1e6:.1f} MB measured on disk)")
    console.print("tensors by type: " + ", ".join(f"{k} {v}" for k, v in report["tensor_type_counts"].items()))
    for sub in report.get("substitutions", []):
        console.print(f"[yellow]kept {sub['tensor']} at {sub['written']}[/] instead of {sub['wanted']}: {sub['reason']}")
    for note in report.get("notes", []):
        console.print(f"[yellow]note:[/] {note}")
    if result.verdict is not None:
        print_verdict(result.verdict, "Verified (measured in the artifact's runtime against PyTorch)")
    console.print(f"manifest: {result.manifest}")


def print_verdict(verdict, title: str) -> None:
    if verdict.metrics is not None:
        m = verdict.metrics
        table = Table(title=title, title_justify="left")
        for column in ("positions", "top-1 agreement", "mean KL", "max KL", "max |Δlogit|", "ppl reference", "ppl artifact"):
            table.add_column(column, justify="right")
        table.add_row(str(m.positions), f"{m.top1_agreement:.2%}", f"{m.mean_kl:.5f}", f"{m.max_kl:.4f}",
                      f"{m.max_abs_logit_diff:.4f}", f"{m.ppl_reference:.3f}", f"{m.ppl_artifact:.3f}")
        console.print(table)
    for check in verdict.checks:
        mark = "[green]PASS[/]" if check.passed else "[red]FAIL[/]"
        console.print(f"{mark} {check.name}: {check.detail}", highlight=False)
    console.print("[bold green]verified[/]" if verdict.passed else "[bold red]verification failed[/]")


@handle_user_errors
def verify_command(
    artifact: Path = typer.Argument(..., help="A .gguf file or an ONNX directory written by `shrink export`."),
    reference: str = typer.Option(None, help="The model to compare with (default: the source named in the artifact's manifest)."),
    prompts: Path = typer.Option(None, help="Text file (blocks separated by blank lines); default: varied built-in text."),
    baseline: Path = typer.Option(None, help="An earlier artifact's manifest: fail if quality fell by more than the tolerances."),
    min_top1: float = typer.Option(None, help="Minimum top-1 agreement (default: per number format)."),
    max_kl: float = typer.Option(None, help="Maximum mean KL(reference || artifact) in nats (default: per number format)."),
    top1_tolerance: float = typer.Option(0.01, help="With --baseline: allowed drop in top-1 agreement."),
    kl_tolerance: float = typer.Option(0.02, help="With --baseline: allowed rise in mean KL."),
    threads: int = typer.Option(None, help="Runtime threads (default: all cores)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
    junit: Path = typer.Option(None, help="Also write the checks as a JUnit XML file for CI."),
) -> None:
    """Run an artifact in its runtime and the reference in PyTorch on the same tokens, and gate on the result.

    Checks the artifact's sha256 against its manifest, then top-1 agreement and KL against the reference,
    then (with --baseline) regression against an earlier artifact. Exit code 0 pass, 1 fail, 2 bad input.
    """
    verdict = verify_artifact(artifact, reference, prompts_file=str(prompts) if prompts else None,
                              baseline=str(baseline) if baseline else None, min_top1=min_top1, max_kl=max_kl,
                              top1_tolerance=top1_tolerance, kl_tolerance=kl_tolerance, threads=threads)
    if junit is not None:
        atomic_write_text(junit, junit_xml(verdict, f"shrink verify {artifact.name}"))
    if json_out:
        print_json({"artifact": str(artifact), **verdict.to_dict()})
    else:
        print_verdict(verdict, f"Verify {artifact} (measured)")
    if not verdict.passed:
        raise typer.Exit(1)


@handle_user_errors
def generate_command(
    artifact: Path = typer.Argument(..., help="A .gguf file or an ONNX directory written by `shrink export`."),
    prompt: str = typer.Option("The capital of France is", help="Text to continue."),
    max_tokens: int = typer.Option(32, help="Tokens to generate (greedy)."),
    threads: int = typer.Option(None, help="Runtime threads (default: all cores)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Continue a prompt greedily inside the artifact's runtime, with the artifact's own tokenizer."""
    result = generate(artifact, prompt, max_tokens, threads)
    if json_out:
        print_json(asdict(result))
        return
    console.print(f"[bold]{result.prompt}[/]{result.text}", highlight=False)
    console.print(f"{result.new_tokens} tokens in {result.runtime}, {result.seconds:.2f} s measured (prompt included)")
