"""`shrink quantize`: post-training quantization, then optionally quantization-aware distillation (QAD).

The student is the model with its planned Linear weights fake-quantized on the grid the export will
store (compress/quant/plan.py); PTQ calibration prepares the weights, QAD trains them against the
original model's logits with the same trainer as `shrink distill`. The output is a Hugging Face
directory holding the on-grid weights and the plan, which `shrink export` packs without re-rounding.
The work is flows/steps.py's `quantize`, the function a recipe's quantize step calls; this module
parses and renders.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, handle_user_errors, print_json
from shrink.cli.training import cli_hooks, saved_by_main
from shrink.compress.distill.parallel import world
from shrink.errors import ShrinkError
from shrink.flows import defaults
from shrink.flows.steps import load_model, prepare_split, quantize, quantize_settings
from shrink.model import save_loaded


@handle_user_errors
def quantize_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the quantized student (on-grid weights + plan)."),
    format: str = typer.Option(..., "--format", "-f", help="nvfp4, mxfp4, fp8, int8, int4, ternary or binary."),
    runtime: str = typer.Option(defaults.QUANT_RUNTIME, help="Where the export will run: gguf (llama.cpp), onnx (ONNX Runtime) or torch; picks the grid."),
    calibration: str = typer.Option(defaults.CALIBRATION, help="PTQ calibration: max (absmax scales), mse (clip search per scale group), awq (activation-aware scaling) or auto (awq for Llama-style decoders, else mse)."),
    qad: bool = typer.Option(False, "--qad", help="After PTQ, distill the fake-quantized student towards the original (quantization-aware distillation)."),
    ptq_only: bool = typer.Option(False, "--ptq-only", help="Stop after PTQ calibration (the default when --qad is not given)."),
    tokens: int = typer.Option(defaults.QAD_TOKENS, help="QAD budget in training tokens (steps = tokens / (batch size x sequence length))."),
    keep: list[str] = typer.Option(None, help="Module-name pattern to keep in high precision (repeatable); default: lm_head, routers, embeddings."),
    activations: str = typer.Option(None, help="Also fake-quantize Linear inputs per token in this format (PyTorch runtime only), e.g. fp8_e4m3."),
    teacher: str = typer.Option(None, help="Teacher for QAD (default: MODEL itself, unquantized)."),
    teacher_load: str = typer.Option(None, help="Load the teacher through bitsandbytes: 8bit or nf4 (for teachers larger than memory)."),
    data: str = typer.Option(None, help="Calibration/training text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the model writes itself (cached)."),
    seq_len: int = typer.Option(defaults.SEQ_LEN, help="Tokens per sequence."),
    batch_size: int = typer.Option(defaults.BATCH_SIZE, help="Sequences per QAD step."),
    lr: float = typer.Option(None, help="QAD peak learning rate; default by grid: 1e-7 for 8-bit grids (Q8_0, INT8, FP8), 1e-5 for 4-bit and lower (where each comes from: compress/quant/run.py, QAD_LR)."),
    precision: str = typer.Option("fp32", help="QAD's precision: fp32, or bf16 autocast (faster on GPUs and CPUs with native bf16; with --parallel fsdp the weights are gathered in bf16)."),
    activation_checkpointing: bool = typer.Option(False, "--activation-checkpointing", help="QAD recomputes each layer's activations in the backward pass (less memory, same result, slower)."),
    parallel: str = typer.Option("auto", help="QAD under torchrun: ddp (the whole student in every process), fsdp (FSDP2: weights, gradients and optimizer state 1/N per process) or auto (fsdp when the training state would take over a quarter of one process's memory)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Quantize a model's weights on a runtime's grid: PTQ, then optionally QAD, measured before and after.

    Examples:

      shrink quantize gemma-3-270m --format int4 --ptq-only -o gemma-q4

      shrink quantize gemma-3-270m --format int4 --calibration awq --qad --tokens 32768 -o gemma-q4-qad

      shrink export gemma-q4-qad -f gguf -o gemma-q4-qad.gguf   # packs the student's own Q4_0 grid

      torchrun --standalone --nproc_per_node 8 --no-python shrink quantize big-model -f nvfp4 --qad --parallel fsdp -o big-nvfp4
    """
    if qad and ptq_only:
        raise ShrinkError("--qad and --ptq-only exclude each other: QAD starts from the PTQ result.")
    current = world()
    if qad:
        current.check_batch(batch_size)
    settings = quantize_settings(format, runtime=runtime, calibration=calibration, qad=qad, tokens=tokens,
                                 batch_size=batch_size, lr=lr, keep=tuple(keep) if keep else None,
                                 activations=activations, parallel=parallel, precision=precision,
                                 activation_checkpointing=activation_checkpointing)  # an unknown format fails here, before loading
    with Spinner() as spinner:
        hooks = cli_hooks(spinner)
        student = load_model(model, hooks)
        teacher_model = load_model(teacher or model, hooks, teacher_load, role="the teacher ")
        split = prepare_split(teacher_model, data, seq_len, hooks)
        result = quantize(student, teacher_model, split, settings, Path(f"{output}.checkpoints"), hooks)
    if not saved_by_main(current, lambda: save_loaded(student, output)):
        return
    result = {"output": str(output), **result}
    if json_out:
        print_json(result)
        return
    _print(model, result, split)


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
