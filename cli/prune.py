"""`shrink prune`: Minitron-style structured pruning by activation importance, saved as a model directory.

Two ways to say what to keep: explicit sizes (--ffn, --heads, --kv-groups, --hidden, --layers), or a
budget (--params, --memory, --budget with --target) from which a uniform shape is chosen by a fixed
rule, or, with --search, by a short distillation proxy over several candidates. The pruning itself is
flows/steps.py's `prune`, the function a recipe's prune step calls; this module parses and renders.
"""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from shrink.archspec import AttentionSpec, SSMSpec
from shrink.cli.inspect import MODEL_HELP
from shrink.cli.render import Spinner, console, handle_user_errors, print_json
from shrink.cli.training import cli_hooks, saved_by_main
from shrink.compress.distill.parallel import world
from shrink.compress.data import local_file
from shrink.compress.search import check_axis
from shrink.errors import ShrinkError
from shrink.flows import defaults
from shrink.flows.steps import check_depth_criterion, load_model, prepare_split, prune, prune_budget
from shrink.model import save_loaded
from shrink.units import fmt_bytes, fmt_time, parse_duration, parse_size


@handle_user_errors
def prune_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    output: Path = typer.Option(..., "--output", "-o", help="Directory for the pruned model (Hugging Face layout)."),
    ffn: str = typer.Option(None, help="FFN neurons to keep in every layer, or one count per FFN layer: 1024,1024,768,..."),
    heads: str = typer.Option(None, help="Query heads to keep per KV group (GQA kept), or one count per attention layer: 4,4,2,..."),
    ssm_heads: int = typer.Option(None, help="Mamba heads to keep per SSM group (every group keeps the same number)."),
    ssm_head_dim: int = typer.Option(None, help="Channels to keep in every Mamba head (the same channels in all heads)."),
    kv_groups: int = typer.Option(None, help="KV groups to keep (each with its query heads)."),
    layers: int = typer.Option(None, help="Layers to keep (depth pruning)."),
    hidden: int = typer.Option(None, help="Embedding channels to keep (norms rescaled so the kept channels compute as before)."),
    params: float = typer.Option(None, help="Budget: fraction of the non-embedding parameters to keep, e.g. 0.6."),
    memory: str = typer.Option(None, help="Budget: weights + KV cache + SSM state at the workload, e.g. 300MB (estimated)."),
    budget: str = typer.Option(None, help="Budget: estimated decode time per token on --target, e.g. 20ms."),
    target: str = typer.Option(None, "--target", "-t", help="Hardware profile for --budget (see `shrink profiles`)."),
    weights: str = typer.Option(None, help="Weight format the budget is costed in, e.g. q8_0 for a GGUF deployment (default: the model's dtype)."),
    axis: str = typer.Option(defaults.PRUNE_AXIS, help="With a budget: prune width (FFN, heads, hidden), depth (layers) or both."),
    search: bool = typer.Option(False, "--search", help="With a budget: rank several candidate shapes by a short distillation and keep the best."),
    candidates: int = typer.Option(defaults.SEARCH_CANDIDATES, help="Candidates the --search distils."),
    proxy_steps: int = typer.Option(defaults.SEARCH_PROXY_STEPS, help="Distillation steps per --search candidate."),
    depth_criterion: str = typer.Option(defaults.DEPTH_CRITERION, help="Layer importance: bi (Block Influence, one pass) or kl (KL to the full model without each layer, one pass per layer)."),
    data: str = typer.Option(None, help="Calibration text: .txt/.jsonl/.parquet or a Hugging Face dataset; default: text the model writes itself (cached)."),
    seq_len: int = typer.Option(defaults.SEQ_LEN, help="Calibration sequence length in tokens."),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout."),
) -> None:
    """Prune width (FFN, heads, KV groups, hidden) and depth by activation importance, and save the model.

    The most important units by activation statistics are kept; every axis slices real tensors.
    Give sizes, or a budget and let shrink choose the shape.

    Examples:

      shrink prune gemma-3-270m --ffn 1536 --layers 16 -o gemma-pruned

      shrink prune nvidia/Nemotron-H-8B-Base-8K --ssm-heads 12 --ssm-head-dim 48 -o nemotron-pruned

      shrink prune gemma-3-270m --params 0.6 -o gemma-60

      shrink prune gemma-3-270m --target jetson-orin --budget 2ms --axis both --search -o gemma-orin
    """
    ffn, heads = _sizes(ffn, "--ffn"), _sizes(heads, "--heads")
    sizes = {"ffn": ffn, "heads": heads, "kv_groups": kv_groups, "hidden": hidden, "layers": layers,
             "ssm_heads": ssm_heads, "ssm_head_dim": ssm_head_dim}
    budgeted = any(v is not None for v in (params, memory, budget))
    if budgeted and any(v is not None for v in sizes.values()):
        raise ShrinkError("Give either sizes (--ffn, --heads, ...) or a budget (--params, --memory, --budget), not both.")
    if not budgeted and not any(v is not None for v in sizes.values()):
        raise ShrinkError("Say what to prune: sizes (--ffn, --heads, --kv-groups, --hidden, --layers, --ssm-heads, "
                          "--ssm-head-dim) or a budget "
                          "(--params, --memory, --budget with --target).")
    current = world()  # under torchrun the processes share the scoring passes; rank 0 saves
    if search and current.size > 1:
        raise ShrinkError("--search runs in one process; under torchrun prune by the fixed rule or to sizes.")
    if search and not budgeted:
        raise ShrinkError("--search chooses among shapes that meet a budget: give --params, --memory or --budget.")
    if budgeted:
        check_axis(axis)  # before the calibration text and the importance pass, minutes on a real model
    check_depth_criterion(depth_criterion)
    if data:
        local_file(data)
    plan_budget = None
    if budgeted:
        plan_budget = prune_budget(params, parse_size(memory, "--memory") if memory else None,
                                   parse_duration(budget, "--budget") if budget else None, target)
    with Spinner() as spinner:
        hooks = cli_hooks(spinner)
        loaded = load_model(model, hooks)
        before = loaded.spec.param_counts().total
        split = prepare_split(loaded, data, seq_len, hooks)
        result = prune(loaded, split, hooks, sizes=None if budgeted else sizes, budget=plan_budget, axis=axis,
                       search=search, candidates=candidates, proxy_steps=proxy_steps, weights=weights,
                       depth_criterion=depth_criterion)
    pruned, report, importance = result.model, result.report, result.importance
    if not saved_by_main(current, lambda: save_loaded(pruned, output)):
        return
    after = pruned.spec.param_counts().total
    if json_out:
        print_json({"output": str(output), "params_before": before, "params_after": after,
                    "calibration_tokens": importance.tokens, "data": split.source, **report,
                    "spec": pruned.spec.to_dict()})
        return
    if report.get("candidates"):
        console.print(_candidates_table(report))
    console.print(_shapes_table(f"Pruned {model} -> {output}", (("before", loaded.spec, before), ("after", pruned.spec, after))))
    if report.get("chosen"):
        chosen = report["chosen"]
        figures = [f"{chosen['non_embedding_params'] / report['non_embedding_before']:.1%} of the non-embedding parameters"]
        if "decode_s_estimated" in chosen:
            figures.append(f"decode {fmt_time(chosen['decode_s_estimated'])}/token estimated on {target}")
        if "memory_bytes_estimated" in chosen:
            figures.append(f"{fmt_bytes(chosen['memory_bytes_estimated'])} estimated memory")
        console.print(f"chosen by {report['chosen_by']}: " + ", ".join(figures))
    console.print(f"importance from {importance.tokens:,} calibration tokens ({split.source}); "
                  f"next: shrink distill {output} --teacher {model} -o {output}-distilled")


def _sizes(text, option):
    """`N` (every layer) or `N1,N2,...` (one per layer that has the unit)."""
    if text is None:
        return None
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise ShrinkError(f"{option} takes a count or comma-separated counts, e.g. 1024 or 1024,768; got '{text}'.") from None
    return values[0] if len(values) == 1 else values


def _widths(values):
    distinct = sorted(set(values))
    return str(distinct[0]) if len(distinct) == 1 else f"{distinct[0]}-{distinct[-1]}"


def _shapes_table(title, rows):
    table = Table(title=title, title_justify="left")
    for column in ("", "layers", "hidden", "FFN", "heads / KV heads", "SSM heads x dim", "parameters"):
        table.add_column(column)
    for label, spec, total in rows:
        attention = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, AttentionSpec)]
        ssm = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, SSMSpec)]
        ffn = [layer.ffn.width for layer in spec.layers if layer.ffn is not None]
        heads = (f"{_widths([a.num_heads for a in attention])} / {_widths([a.num_kv_heads for a in attention])}"
                 if attention else "-")
        table.add_row(label, str(spec.num_layers), str(spec.hidden_size), _widths(ffn) if ffn else "-", heads,
                      f"{ssm[0].num_heads} x {ssm[0].head_dim}" if ssm else "-", f"{total:,}")
    return table


def _candidates_table(report: dict) -> Table:
    table = Table(title="Candidates ranked by the distillation proxy (KL measured on held-out text)", title_justify="left")
    for column in ("ffn", "heads/group", "hidden", "layers", "non-emb. params", "KL pruned", "KL after proxy"):
        table.add_column(column, justify="right")
    for c in report["candidates"]:
        table.add_row(str(c["ffn"]), str(c["heads_per_group"]), str(c["hidden"]), str(c["layers"]),
                      f"{c['non_embedding_params']:,}", f"{c['kl_pruned']:.4f}", f"{c['kl_after_proxy']:.4f}")
    return table
