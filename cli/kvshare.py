"""`shrink kv-share`: cross-layer KV sharing, then (by default) a distillation that recovers what sharing
cost, saved as a model directory. The work is flows/kvshare.py's and the shared trainer's."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import typer

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, handle_user_errors, print_json
from shrink.cli.training import cli_hooks
from shrink.compress.distill.teacher import teacher_topk
from shrink.flows import defaults
from shrink.flows.kvshare import share
from shrink.flows.steps import distill, distill_config, evaluate_against, load_model, prepare_split
from shrink.model import save_loaded
from shrink.units import fmt_bytes


@handle_user_errors
def kv_share_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the shared model (Hugging Face layout)."),
    groups: str = typer.Option("", help="Layers that share, e.g. 0-1,2-3 (the first of each group owns the cache); default: chosen."),
    pairs: int = typer.Option(None, help="Without --groups: how many pairs share, the most alike first (default: every pair that fits)."),
    init: str = typer.Option("mean", help="mean: the owner's K/V projections start as the group's mean (AcrossKV); owner: its own."),
    target: str = typer.Option("host", "--target", "-t", help="Profile the KV-cache estimate is made for."),
    tokens: int = typer.Option(defaults.DISTILL_TOKENS, help="Distillation tokens after sharing (0: none)."),
    lr: float = typer.Option(defaults.DISTILL_LR, help="Distillation learning rate."),
    data: str = typer.Option(None, help="Calibration and training text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the model writes itself (cached)."),
    seq_len: int = typer.Option(defaults.SEQ_LEN, help="Sequence length in tokens."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Let groups of neighbouring layers share one KV cache (cross-layer attention), then distil.

    Consumers keep their queries and attend to their group owner's keys and values, so they store no
    cache: at long prompts the KV cache shrinks by the sharing factor. Layers pair only with layers of
    the same attention kind (Gemma 3: local with local, global with global); which pairs share is
    chosen by how alike their keys and values are on calibration text.

    Examples:

      shrink kv-share gemma-3-270m -o gemma-cla

      shrink kv-share meta-llama/Llama-3.2-1B --groups 8-9,10-11,12-13,14-15 --tokens 49152 -o llama-cla
    """
    with Spinner() as spinner:
        hooks = cli_hooks(spinner)
        loaded = load_model(model, hooks)
        split = prepare_split(loaded, data, seq_len, hooks)
        shared, report = share(loaded, split.calibration, hooks, groups=groups, pairs=pairs, init=init, target=target)
        if tokens > 0:
            result = distill(shared, loaded, split, distill_config(tokens=tokens, lr=lr), Path(f"{output}.checkpoints"), hooks)
            report["distillation"] = asdict(result)
        else:
            report["held_out"] = evaluate_against(shared.model, split, teacher_topk(loaded.model, split.evaluation))
    save_loaded(shared, output)
    if json_out:
        print_json({**report, "output": str(output), "spec": shared.spec.to_dict()})
        return
    kv = report["kv_cache_bytes_estimated"]
    console.print(f"sharing groups: {', '.join('-'.join(map(str, g)) for g in report['groups'])}")
    console.print(f"KV cache at a {kv['prompt_len']}-token prompt on {target}: {fmt_bytes(kv['before'])} -> "
                  f"{fmt_bytes(kv['after'])} (estimated)")
    if "held_out" in report:
        console.print(f"held-out KL to the original right after sharing: {report['held_out']['kl']:.4f} (measured)")
    if "distillation" in report:
        d = report["distillation"]
        console.print(f"held-out KL to the original: {d['eval_before']['kl']:.4f} after sharing -> "
                      f"{d['eval_after']['kl']:.4f} after {d['tokens']:,} distillation tokens (measured)")
    console.print(f"saved {output}; next: shrink export {output} -f onnx")
