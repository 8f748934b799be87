"""`shrink puzzle`: a per-layer architecture search (Puzzle) under a budget on a hardware target, saved as
a model directory. The work is flows/puzzle.py's; this module parses and renders."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, handle_user_errors, print_json
from shrink.cli.training import cli_hooks, saved_by_main
from shrink.compress.distill.parallel import world
from shrink.flows import defaults
from shrink.flows.puzzle import PuzzleSettings, puzzle
from shrink.flows.steps import load_model, prepare_split
from shrink.hardware.roofline import Workload
from shrink.model import save_loaded
from shrink.units import fmt_bytes, fmt_time, parse_duration, parse_size


@handle_user_errors
def puzzle_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    target: str = typer.Option(..., "--target", "-t", help="Hardware profile the variants are costed on (see `shrink profiles`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the chosen model (Hugging Face layout)."),
    budget: str = typer.Option(None, help="Estimated time per output token on --target, e.g. 4ms."),
    ttft: str = typer.Option(None, help="Estimated time to first token on --target for --prompt-len tokens, e.g. 200ms."),
    memory: str = typer.Option(None, help="Memory at the workload as shrink estimate totals it (weights, KV cache or state, activations), e.g. 300MB (estimated)."),
    weights: str = typer.Option(None, help="Weight format the blocks are costed in, e.g. q8_0 (default: the model's dtype)."),
    prompt_len: int = typer.Option(512, help="Prompt tokens of the workload the costs are estimated for."),
    bld_steps: int = typer.Option(PuzzleSettings.bld_steps, help="Blockwise-distillation steps per variant."),
    distill_tokens: int = typer.Option(defaults.DISTILL_TOKENS, help="Global distillation tokens after assembly (0: none)."),
    hidden_weight: float = typer.Option(0.0, help="Weight of the hidden-state term (every layer's normalized MSE to the parent's) beside the KL in global distillation; runs the parent alongside."),
    alternatives: int = typer.Option(1, help="Distinct solutions to list (each shares at most 80% of its choices)."),
    work: Path = typer.Option(None, help="Where trained variants and scores are kept for resuming (default: OUTPUT.work)."),
    data: str = typer.Option(None, help="Calibration text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the model writes itself (cached)."),
    seq_len: int = typer.Option(defaults.SEQ_LEN, help="Sequence length in tokens."),
    parallel: str = typer.Option("auto", help="Under torchrun: ddp (each process trains a disjoint share of the variants; data parallel global distillation), fsdp (every variant and the assembled student sharded with FSDP2 over all processes) or auto (fsdp when the training state would take over a quarter of one process's memory)."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Give each layer the attention and FFN variant that buys most quality for its cost on the target.

    Every layer's variants (pooled KV heads, narrower FFNs, linear maps, no-ops) are trained to imitate
    the parent's block (blockwise local distillation), scored by the KL of the parent with only that
    block replaced, costed by the roofline on --target, and one per block is chosen by a mixed-integer
    program under the budget; the result is distilled globally and saved. Rerun the same command to
    resume after an interruption. Under torchrun the processes share the importance pass, the
    blockwise distillation, the scores and the global distillation.

    Examples:

      shrink puzzle gemma-3-270m --target jetson-orin-nano --budget 3ms -o gemma-puzzle

      shrink puzzle meta-llama/Llama-3.2-1B --target h100 --ttft 20ms --weights fp8 -o llama-puzzle
    """
    settings = PuzzleSettings(
        target=target, budget_s=parse_duration(budget, "--budget") if budget else None,
        ttft_s=parse_duration(ttft, "--ttft") if ttft else None,
        memory_bytes=parse_size(memory, "--memory") if memory else None, weights=weights,
        bld_steps=bld_steps, distill_tokens=distill_tokens, hidden_weight=hidden_weight, alternatives=alternatives,
        workload=Workload(prompt_len=prompt_len), parallel=parallel)
    settings.limits()  # no budget: refused before loading anything
    current = world()
    current.check_batch(defaults.BATCH_SIZE)  # the global distillation's batch
    with Spinner() as spinner:
        hooks = cli_hooks(spinner)
        loaded = load_model(model, hooks)
        split = prepare_split(loaded, data, seq_len, hooks)
        child, report = puzzle(loaded, split, settings, work or output.with_name(output.name + ".work"), hooks)
    if not saved_by_main(current, lambda: save_loaded(child, output)):
        return
    report["output"] = str(output)
    if json_out:
        print_json({**report, "spec": child.spec.to_dict()})
        return
    console.print(_choice_table(report))
    parent, chosen = report["parent_estimated"], report["chosen_estimated"]
    console.print(f"{target}: decode {fmt_time(parent['decode_s'])} -> {fmt_time(chosen['decode_s'])}/token, "
                  f"prefill {fmt_time(parent['prefill_s'])} -> {fmt_time(chosen['prefill_s'])} (estimated); "
                  f"memory {fmt_bytes(chosen['memory_bytes'])} (estimated)")
    if "distillation" in report:
        after = report["distillation"]["eval_after"]
        console.print(f"held-out KL to the parent after global distillation: {after.get('kl', float('nan')):.4f} (measured)")
    console.print(f"saved {output}; next: shrink export {output} -f onnx")


def _choice_table(report: dict) -> Table:
    table = Table(title="Chosen variant per layer (replace-one-block KL, measured)", title_justify="left")
    for column in ("layer", "attention", "KL", "FFN", "KL"):
        table.add_column(column, justify="right")
    kl = report["replace_one_block_kl"]
    for i, layer in enumerate(report["solutions"][0]["layers"]):
        attention, ffn = layer["attention"], layer["ffn"]
        table.add_row(str(i), attention, f"{kl[f'{i}|attention:{attention}']:.4f}", ffn, f"{kl[f'{i}|ffn:{ffn}']:.4f}")
    return table
