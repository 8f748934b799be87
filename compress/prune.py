"""Structured pruning by real slicing: the pruned model has smaller tensors and a rewritten config.

Each function keeps the most important units (compress/importance.py) and returns a new
LoadedModel; the input model is left untouched. The invariant the tests hold every axis to: the
pruned model's logits equal those of the full model with the same units masked to zero.
Uniform pruning (the same width in every layer, as Minitron) rewrites the config so that
transformers reloads the model as it is.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from shrink.compress.importance import Importance, _check_family
from shrink.errors import ShrinkError
from shrink.families import spec_from_model


def _sliced_linear(linear: Any, rows: Any = None, cols: Any = None) -> Any:
    import torch

    weight = linear.weight.detach()
    bias = linear.bias.detach() if linear.bias is not None else None
    if rows is not None:
        weight = weight[rows]
        bias = bias[rows] if bias is not None else None
    if cols is not None:
        weight = weight[:, cols]
    new = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if bias is not None:
            new.bias.copy_(bias)
    return new


def _top(scores: Any, keep: int) -> Any:
    import torch

    return torch.sort(torch.topk(scores, keep).indices).values


def _copy(loaded: Any) -> tuple[Any, Any]:
    _check_family(loaded)
    model = copy.deepcopy(loaded.model)
    return model, getattr(model.config, "text_config", None) or model.config


def _result(loaded: Any, model: Any, suffix: str) -> Any:
    spec = replace(spec_from_model(model), formats=loaded.spec.formats, name=f"{loaded.spec.name}-{suffix}")
    return replace(loaded, model=model.eval(), spec=spec)


def prune_ffn(loaded: Any, importance: Importance, width: int) -> Any:
    """Keep the `width` most important FFN neurons in every layer."""
    widths = {layer.ffn.width for layer in loaded.spec.layers}
    if not 0 < width <= min(widths):
        raise ShrinkError(f"FFN width must be between 1 and {min(widths)}, got {width}.")
    model, config = _copy(loaded)
    for block, scores in zip(model.model.layers, importance.ffn):
        keep = _top(scores, width)
        mlp = block.mlp
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, rows=keep)
        mlp.up_proj = _sliced_linear(mlp.up_proj, rows=keep)
        mlp.down_proj = _sliced_linear(mlp.down_proj, cols=keep)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = width
    config.intermediate_size = width
    return _result(loaded, model, f"ffn{width}")


def prune_heads(loaded: Any, importance: Importance, heads_per_group: int) -> Any:
    """Keep the `heads_per_group` most important query heads inside every KV group (GQA kept)."""
    import torch

    model, config = _copy(loaded)
    for i, block in enumerate(model.model.layers):
        attn, a = block.self_attn, loaded.spec.layers[i].mixer
        group = a.num_heads // a.num_kv_heads
        if not 0 < heads_per_group <= group:
            raise ShrinkError(f"Heads per KV group must be between 1 and {group}, got {heads_per_group}.")
        heads = torch.cat([g * group + _top(importance.heads[i][g * group:(g + 1) * group], heads_per_group)
                           for g in range(a.num_kv_heads)])
        rows = torch.cat([torch.arange(h * a.head_dim, (h + 1) * a.head_dim) for h in heads.tolist()])
        attn.q_proj = _sliced_linear(attn.q_proj, rows=rows)
        attn.o_proj = _sliced_linear(attn.o_proj, cols=rows)
        attn.num_key_value_groups = heads_per_group
    _pin_head_dim(config, loaded)
    config.num_attention_heads = heads_per_group * loaded.spec.layers[0].mixer.num_kv_heads
    return _result(loaded, model, f"heads{config.num_attention_heads}")


def prune_kv_groups(loaded: Any, importance: Importance, groups: int) -> Any:
    """Keep the `groups` most important KV groups (each with all its query heads)."""
    import torch

    model, config = _copy(loaded)
    for i, block in enumerate(model.model.layers):
        attn, a = block.self_attn, loaded.spec.layers[i].mixer
        if not 0 < groups <= a.num_kv_heads:
            raise ShrinkError(f"KV groups must be between 1 and {a.num_kv_heads}, got {groups}.")
        per_group = a.num_heads // a.num_kv_heads
        kept = _top(importance.kv_groups(i, a.num_kv_heads), groups).tolist()
        kv_rows = torch.cat([torch.arange(g * a.head_dim, (g + 1) * a.head_dim) for g in kept])
        q_rows = torch.cat([torch.arange(g * per_group * a.head_dim, (g + 1) * per_group * a.head_dim) for g in kept])
        attn.q_proj = _sliced_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = _sliced_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = _sliced_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = _sliced_linear(attn.o_proj, cols=q_rows)
    a = loaded.spec.layers[0].mixer
    _pin_head_dim(config, loaded)
    config.num_key_value_heads = groups
    config.num_attention_heads = groups * (a.num_heads // a.num_kv_heads)
    return _result(loaded, model, f"kv{groups}")


def _pin_head_dim(config: Any, loaded: Any) -> None:
    # Configs without head_dim (Qwen2) derive it as hidden / heads, which head pruning would change.
    config.head_dim = loaded.spec.layers[0].mixer.head_dim


def prune_layers(loaded: Any, importance: Importance, keep: int) -> Any:
    """Depth pruning: keep the `keep` layers with the highest Block Influence, in their order."""
    import torch

    total = loaded.spec.num_layers
    if not 0 < keep <= total:
        raise ShrinkError(f"Layers to keep must be between 1 and {total}, got {keep}.")
    model, config = _copy(loaded)
    kept = _top(importance.layers, keep).tolist()
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in kept])
    for new_index, block in enumerate(model.model.layers):
        block.self_attn.layer_idx = new_index  # the KV cache is indexed by it
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    return _result(loaded, model, f"layers{keep}")


def prune_hidden(loaded: Any, importance: Importance, hidden: int) -> Any:
    """Keep the `hidden` most important embedding channels in every tensor that touches the residual
    stream. RMSNorm averages over the channels it sees, so every hidden-size norm's weight is scaled
    by sqrt(d / d') and its epsilon by d / d': the pruned model then computes exactly what the full
    model computes with the dropped channels held at zero."""
    import math

    import torch

    d = loaded.spec.hidden_size
    if not 0 < hidden <= d:
        raise ShrinkError(f"Hidden size must be between 1 and {d}, got {hidden}.")
    model, config = _copy(loaded)
    keep = _top(importance.hidden, hidden)
    ratio = d / hidden
    gemma = loaded.spec.family == "gemma3"  # Gemma's norms compute x * (1 + w)
    scale = math.sqrt(ratio)

    def norm(module: Any, factor: float) -> None:
        with torch.no_grad():
            w = module.weight.detach()[keep] if module.weight.shape[0] == d else module.weight.detach()
            w = (1 + w) * factor - 1 if gemma else w * factor
            module.weight = torch.nn.Parameter(w.clone())
        for attribute in ("eps", "variance_epsilon"):
            if hasattr(module, attribute):
                setattr(module, attribute, getattr(module, attribute) * ratio)

    embed = model.model.embed_tokens
    with torch.no_grad():
        weight = embed.weight.detach()[:, keep].clone()
        if hasattr(embed, "embed_scale"):  # Gemma multiplies by sqrt(hidden size), which shrinks with it
            weight *= scale
            embed.embed_scale.fill_(math.sqrt(hidden))
            embed.scalar_embed_scale = math.sqrt(hidden)
        embed.weight = torch.nn.Parameter(weight)
        embed.embedding_dim = hidden
    for block in model.model.layers:
        attn, mlp = block.self_attn, block.mlp
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(attn, name, _sliced_linear(getattr(attn, name), cols=keep))
        attn.o_proj = _sliced_linear(attn.o_proj, rows=keep)
        mlp.gate_proj = _sliced_linear(mlp.gate_proj, cols=keep)
        mlp.up_proj = _sliced_linear(mlp.up_proj, cols=keep)
        mlp.down_proj = _sliced_linear(mlp.down_proj, rows=keep)
        for module in block.modules():
            if module is not block and "RMSNorm" in type(module).__name__:
                # hidden-size norms are rescaled; q/k norms (head_dim) only share the config's epsilon
                norm(module, scale if module.weight.shape[0] == d else 1.0)
    tied = loaded.spec.tied_embeddings
    # A tied lm_head reads the embedding table, already multiplied by sqrt(d / d') for Gemma: the
    # final norm's own factor and that one cancel.
    final_factor = 1.0 if (tied and hasattr(embed, "embed_scale")) else scale
    norm(model.model.norm, final_factor)
    if tied:
        model.tie_weights()
    else:
        model.lm_head = _sliced_linear(model.lm_head, cols=keep)
    config.hidden_size = hidden
    _pin_head_dim(config, loaded)
    config.rms_norm_eps = config.rms_norm_eps * ratio
    return _result(loaded, model, f"hidden{hidden}")
