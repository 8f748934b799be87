"""`shrink prune`: Minitron-style structured pruning by activation importance, saved as a model directory."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import console, err_console, handle_user_errors, print_json


@handle_user_errors
def prune_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the pruned model (Hugging Face layout)."),
    ffn: int = typer.Option(None, help="FFN neurons to keep in every layer."),
    heads: int = typer.Option(None, help="Query heads to keep per KV group (GQA structure kept)."),
    kv_groups: int = typer.Option(None, help="KV groups to keep (each with its query heads)."),
    layers: int = typer.Option(None, help="Layers to keep (depth pruning)."),
    depth_criterion: str = typer.Option("bi", help="Layer importance for --layers: bi (Block Influence, one pass) or kl (KL to the full model without each layer, one pass per layer)."),
    hidden: int = typer.Option(None, help="Embedding channels to keep (norms rescaled so the kept channels compute as before)."),
    data: str = typer.Option(None, help="Calibration text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the model writes itself (cached)."),
    seq_len: int = typer.Option(128, help="Calibration sequence length in tokens."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Prune width (FFN, heads, KV groups, hidden) and depth by activation importance, and save the model.

    The most important units by activation statistics are kept; every axis slices real tensors.

    Example: shrink prune gemma-3-270m --ffn 1536 --layers 16 -o gemma-pruned
    """
    from shrink.compress.data import prepare
    from dataclasses import replace

    from shrink.compress.importance import cached_score, layer_kl_scores
    from shrink.compress.prune import prune_ffn, prune_heads, prune_hidden, prune_kv_groups, prune_layers
    from shrink.errors import ShrinkError
    from shrink.model import load, save_loaded

    if depth_criterion not in ("bi", "kl"):
        raise ShrinkError(f"--depth-criterion must be bi or kl, not '{depth_criterion}'.")
    if not any(v is not None for v in (ffn, heads, kv_groups, layers, hidden)):
        raise ShrinkError("Say what to prune: --ffn, --heads, --kv-groups, --hidden and/or --layers.")
    with err_console.status(f"Loading {model}"):
        loaded = load(model)
    split = prepare(loaded, data, seq_len=seq_len)
    with err_console.status(f"Scoring importance on {split.calibration.numel():,} calibration tokens"):
        importance = cached_score(loaded, split.calibration)
        if layers is not None and depth_criterion == "kl":
            importance = replace(importance, layers=layer_kl_scores(loaded, split.calibration))
    before = loaded.spec.param_counts().total
    pruned = loaded
    if ffn is not None:
        pruned = prune_ffn(pruned, importance, ffn)
    if kv_groups is not None:
        pruned = prune_kv_groups(pruned, importance, kv_groups)
    if heads is not None:
        pruned = prune_heads(pruned, importance, heads)
    if hidden is not None:
        pruned = prune_hidden(pruned, importance, hidden)
    if layers is not None:
        pruned = prune_layers(pruned, importance, layers)
    save_loaded(pruned, output)
    after = pruned.spec.param_counts().total
    if json_out:
        print_json({"output": str(output), "params_before": before, "params_after": after,
                    "calibration_tokens": importance.tokens, "data": split.source, "spec": pruned.spec.to_dict()})
        return
    table = Table(title=f"Pruned {model} -> {output}", title_justify="left")
    for column in ("", "layers", "hidden", "FFN", "heads / KV heads", "parameters"):
        table.add_column(column)
    for label, spec, total in (("before", loaded.spec, before), ("after", pruned.spec, after)):
        a = spec.layers[0].mixer
        table.add_row(label, str(spec.num_layers), str(spec.hidden_size), str(spec.layers[0].ffn.width),
                      f"{a.num_heads} / {a.num_kv_heads}", f"{total:,}")
    console.print(table)
    console.print(f"importance from {importance.tokens:,} calibration tokens ({split.source}); "
                  "distillation to recover quality is the next step (not written yet)")
