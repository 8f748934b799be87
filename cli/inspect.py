"""`shrink inspect MODEL`: the ArchSpec as a table or JSON, with parameter counts."""

from __future__ import annotations

import typer
from rich.table import Table

from shrink.archspec import ArchSpec, AttentionSpec, LayerSpec, LinearSpec, SSMSpec
from shrink.cli.render import console, handle_user_errors, print_json
from shrink.model import load as load_model
from shrink.model import load_spec

MODEL_HELP = (
    "A model: 'gemma-3-270m' (embedded default), a Hugging Face directory, a .gguf file, "
    "a config.json or ArchSpec .json, a bundled config name (llama-3.1-8b, llama-3.1-70b, llama-3.1-405b), or a hub id."
)


@handle_user_errors
def inspect_command(
    model: str = typer.Argument(..., help=MODEL_HELP),
    load: bool = typer.Option(
        False, "--load", help="Instantiate the weights and read layer shapes from the tensors (pruned, non-uniform models); also counts the instantiated parameters."
    ),
    json_out: bool = typer.Option(False, "--json", help="Print JSON on stdout instead of tables."),
    trust_remote_code: bool = typer.Option(False, help="With --load: allow a hub model's own Python code to run (off: safer). A config alone runs no code."),
) -> None:
    """Describe a model layer by layer: mixers, heads, windows, FFN and SSM shapes, formats, parameter counts.

    Reads only the config unless --load is given, so it works on configs of models too large for this machine.
    """
    instantiated = None
    if load:
        loaded = load_model(model, trust_remote_code=trust_remote_code)
        spec = loaded.spec
        instantiated = sum(p.numel() for p in loaded.model.parameters())
    else:
        spec = load_spec(model)
    counts = spec.param_counts()
    if json_out:
        params = {"embedding": counts.embedding, "non_embedding": counts.non_embedding, "total": counts.total}
        if instantiated is not None:
            params["instantiated"] = instantiated
        print_json({"model": model, "spec": spec.to_dict(), "params": params, "uniform": spec.is_uniform})
        return
    console.print(_summary(model, spec, instantiated))
    console.print(layer_table(spec))


def _summary(model: str, spec: ArchSpec, instantiated: int | None) -> Table:
    counts = spec.param_counts()
    table = Table(title=f"{model}  ({spec.family})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column()
    table.add_row("layers", f"{spec.num_layers} ({'uniform' if spec.is_uniform else 'non-uniform'})")
    table.add_row("hidden size", str(spec.hidden_size))
    table.add_row("vocabulary", f"{spec.vocab_size:,} ({'tied' if spec.tied_embeddings else 'untied'} embeddings)")
    f = spec.formats
    table.add_row("formats", f"weights {f.weights}, embeddings {f.embeddings}, activations {f.activations}, KV cache {f.kv_cache}, SSM state {f.ssm_state}")
    table.add_row("parameters", f"{counts.total:,} total = {counts.embedding:,} embedding + {counts.non_embedding:,} non-embedding")
    if instantiated is not None:
        verdict = "[green]matches[/]" if instantiated == counts.total else "[red]differs from the ArchSpec count[/]"
        table.add_row("instantiated", f"{instantiated:,} parameters in the loaded model ({verdict})")
    return table


def _describe(layer: LayerSpec) -> list[str]:
    m, f = layer.mixer, layer.ffn
    attn = ssm = window = kv_from = "-"
    if isinstance(m, AttentionSpec):
        attn = f"{m.num_heads}q / {m.num_kv_heads}kv x {m.head_dim}" + (" +qk-norm" if m.qk_norm else "")
        window = str(m.sliding_window) if m.sliding_window else "full"
        kv_from = "own" if m.owns_kv else f"layer {m.kv_source}"
    elif isinstance(m, SSMSpec):
        ssm = f"{m.num_heads} x {m.head_dim}, {m.num_groups} groups, state {m.state_size}, conv {m.conv_kernel}"
    ffn = "-"
    if isinstance(m, LinearSpec):
        attn = "linear (hidden x hidden)"
    if isinstance(f, LinearSpec):
        ffn = "linear"
    elif f is not None:
        ffn = f"{f.kind} {f.width}"
        if f.is_moe:
            ffn = f"MoE {f.experts_per_token}/{f.num_experts} x {f.kind} {f.width}" + (f" + shared {f.shared_width}" if f.shared_width else "")
    return [layer.mixer_kind, attn, window, kv_from, ssm, ffn, str(layer.norms)]


def layer_table(spec: ArchSpec) -> Table:
    table = Table(title="Layers", title_justify="left")
    for column in ("layers", "mixer", "attention heads", "window", "KV cache", "SSM (Mamba2)", "FFN", "norms"):
        table.add_column(column)
    for start, end, layer in _runs(spec.layers):
        span = str(start) if start == end else f"{start}-{end}"
        table.add_row(span, *_describe(layer))
    return table


def _runs(layers: tuple[LayerSpec, ...]) -> list[tuple[int, int, LayerSpec]]:
    """Consecutive identical layers, merged: (first index, last index, layer)."""
    runs: list[tuple[int, int, LayerSpec]] = []
    for i, layer in enumerate(layers):
        if runs and runs[-1][2] == layer:
            runs[-1] = (runs[-1][0], i, layer)
        else:
            runs.append((i, i, layer))
    return runs
