"""`shrink quantize`: post-training quantization, then optionally quantization-aware distillation (QAD).

The student is the model with its planned Linear weights fake-quantized on the grid the export will
store (compress/quant/plan.py); PTQ calibration prepares the weights, QAD trains them against the
original model's logits with the same trainer as `shrink distill`. The output is a Hugging Face
directory holding the on-grid weights and the plan, which `shrink export` packs without re-rounding.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, err_console, handle_user_errors, print_json
from shrink.cli.training import run_distillation, spinner_paused


@handle_user_errors
def quantize_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the quantized student (on-grid weights + plan)."),
    format: str = typer.Option(..., "--format", "-f", help="nvfp4, mxfp4, fp8, int8, int4, ternary or binary."),
    runtime: str = typer.Option("gguf", help="Where the export will run: gguf (llama.cpp), onnx (ONNX Runtime) or torch; picks the grid."),
    calibration: str = typer.Option("auto", help="PTQ calibration: max (absmax scales), mse (clip search per scale group), awq (activation-aware scaling) or auto (awq for Llama-style decoders, else mse)."),
    qad: bool = typer.Option(False, "--qad", help="After PTQ, distill the fake-quantized student towards the original (quantization-aware distillation)."),
    ptq_only: bool = typer.Option(False, "--ptq-only", help="Stop after PTQ calibration (the default when --qad is not given)."),
    tokens: int = typer.Option(16384, help="QAD budget in training tokens (steps = tokens / (batch size x sequence length))."),
    keep: list[str] = typer.Option(None, help="Module-name pattern to keep in high precision (repeatable); default: lm_head, routers, embeddings."),
    activations: str = typer.Option(None, help="Also fake-quantize Linear inputs per token in this format (PyTorch runtime only), e.g. fp8_e4m3."),
    teacher: str = typer.Option(None, help="Teacher for QAD (default: MODEL itself, unquantized)."),
    teacher_load: str = typer.Option(None, help="Load the teacher through bitsandbytes: 8bit or nf4 (for teachers larger than memory)."),
    data: str = typer.Option(None, help="Calibration/training text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the model writes itself (cached)."),
    seq_len: int = typer.Option(128, help="Tokens per sequence."),
    batch_size: int = typer.Option(4, help="Sequences per QAD step."),
    lr: float = typer.Option(None, help="QAD peak learning rate; default by grid: 1e-7 for 8-bit grids (Q8_0, INT8, FP8), 1e-5 for 4-bit and lower (where each comes from: compress/quant/run.py, QAD_LR)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Quantize a model's weights on a runtime's grid: PTQ, then optionally QAD, measured before and after.

    Examples:

      shrink quantize gemma-3-270m --format int4 --ptq-only -o gemma-q4

      shrink quantize gemma-3-270m --format int4 --calibration awq --qad --tokens 32768 -o gemma-q4-qad

      shrink export gemma-q4-qad -f gguf -o gemma-q4-qad.gguf   # packs the student's own Q4_0 grid
    """
    from shrink.compress.data import prepare
    from shrink.compress.quant.plan import grid_for
    from shrink.compress.quant.run import QuantizeSettings, quantize_model
    from shrink.errors import ShrinkError
    from shrink.model import load, save_loaded

    if qad and ptq_only:
        raise ShrinkError("--qad and --ptq-only exclude each other: QAD starts from the PTQ result.")
    grid_for(format, runtime)  # an unknown format or runtime fails before any loading
    settings = QuantizeSettings(format=format, runtime=runtime, calibration=calibration, qad=qad, tokens=tokens,
                                batch_size=batch_size, lr=lr, keep=tuple(keep) if keep else None,
                                activations=activations)
    with err_console.status(f"Loading {model}"):
        student = load(model)
    with err_console.status(f"Loading the teacher {teacher or model}"):
        teacher_model = load_teacher(teacher or model, teacher_load)
    split = prepare(teacher_model, data, seq_len=seq_len)
    with Spinner() as spinner:
        result = quantize_model(student, teacher_model, split, settings, Path(f"{output}.checkpoints"),
                                train=spinner_paused(spinner, run_distillation), status=spinner.update)
    save_loaded(student, output)
    result = {"output": str(output), **result}
    if json_out:
        print_json(result)
        return
    _print(model, result, split)


def load_teacher(source: str, mode: str | None):
    from shrink.model import load

    if mode is None:
        return load(source)
    from shrink.model import load_bitsandbytes

    return load_bitsandbytes(source, mode)


def _print(model: str, result: dict, split) -> None:
    table = Table(title=f"{model} -> {result['output']}: {result['format']} on the {result['grid']} grid "
                        f"({result['effective_bits_per_quantized_weight']:.3f} bits per quantized weight, scales included)",
                  title_justify="left")
    for column in ("", "KL to the original (measured)", "perplexity (measured)"):
        table.add_column(column, justify="right")
    table.add_row(f"PTQ ({result['calibration']['method']})", f"{result['ptq']['kl']:.4f}", f"{result['ptq']['perplexity']:.2f}")
    if result["qad"]:
        after = result["qad"]["after"]
        table.add_row(f"QAD ({result['qad']['tokens']:,} tokens)", f"{after['kl']:.4f}", f"{after['perplexity']:.2f}")
    console.print(table)
    if result.get("kept") == "ptq" and result["qad"]:
        console.print("[yellow]QAD raised the held-out KL: the PTQ weights were kept[/] (try a lower --lr than "
                      f"{result['qad']['lr']:g})")
    groups: dict[tuple[str, str], list[str]] = {}
    for fallback in result["fallbacks"]:  # one line per (grid, reason), not per tensor
        groups.setdefault((fallback["grid"], fallback["fallback_reason"]), []).append(fallback["module"])
    for (grid, reason), modules in groups.items():
        console.print(f"[yellow]{len(modules)} weight(s)[/] take {grid}: {reason} (e.g. {modules[0]}; all in --json)")
    console.print(f"held-out text: {split.evaluation.shape[0]} sequences ({split.source}); "
                  f"{len(result['kept_high_precision'])} Linear layers kept in high precision; "
                  f"next: shrink export {result['output']} -f {result['runtime'] if result['runtime'] != 'torch' else 'onnx'}")
