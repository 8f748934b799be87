"""Structured pruning by real slicing: the pruned model has smaller tensors and a rewritten config.

Each function keeps the most important units (compress/importance.py) and returns a new
LoadedModel; the input model is left untouched. The invariant the tests hold every axis to: the
pruned model's logits equal those of the full model with the same units masked to zero.
Uniform pruning (the same width in every layer, as Minitron) rewrites the config so that
transformers reloads the model as it is.
"""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from typing import Any

from shrink import blocks
from shrink.archspec import AttentionSpec, SSMSpec
from shrink.compress.importance import Importance, _check_family
from shrink.errors import ShrinkError
from shrink.families import spec_from_model


def sliced_linear(linear: Any, rows: Any = None, cols: Any = None) -> Any:
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


def narrow_mlp(mlp: Any, keep: Any) -> None:
    """Keep the FFN neurons `keep` (sorted indices) of `mlp`, in place."""
    if hasattr(mlp, "gate_proj"):
        mlp.gate_proj = sliced_linear(mlp.gate_proj, rows=keep)
    mlp.up_proj = sliced_linear(mlp.up_proj, rows=keep)
    mlp.down_proj = sliced_linear(mlp.down_proj, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(keep)


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


def _per_layer(value: int | list[int], layers: list[int], what: str) -> dict[int, int]:
    """A uniform size, or one size per layer that has the unit (layers listed in order)."""
    if isinstance(value, int):
        return {i: value for i in layers}
    if len(value) != len(layers):
        raise ShrinkError(f"{what}: got {len(value)} per-layer values for {len(layers)} layers that have one.")
    return dict(zip(layers, value))


def _config_width(sizes: dict[int, int]) -> int:
    # A non-uniform model's config holds its widest layer; save() records every layer's shape.
    return max(sizes.values())


def prune_ffn(loaded: Any, importance: Importance, width: int | list[int]) -> Any:
    """Keep the `width` most important FFN neurons in every layer (a list: one width per FFN layer)."""
    ffn_layers = [i for i, layer in enumerate(loaded.spec.layers) if layer.ffn is not None]
    sizes = _per_layer(width, ffn_layers, "FFN width")
    for i, size in sizes.items():
        full = loaded.spec.layers[i].ffn.width
        if not 0 < size <= full:
            raise ShrinkError(f"FFN width must be between 1 and {full}, got {size}.")
    model, config = _copy(loaded)
    for i, size in sizes.items():
        narrow_mlp(blocks.mlp(model.model.layers[i]), _top(importance.ffn[i], size))
    config.intermediate_size = _config_width(sizes)
    return _result(loaded, model, f"ffn{_config_width(sizes)}")


def _attention_layers(loaded: Any) -> list[int]:
    return [i for i, layer in enumerate(loaded.spec.layers) if isinstance(layer.mixer, AttentionSpec)]


def prune_heads(loaded: Any, importance: Importance, heads_per_group: int | list[int]) -> Any:
    """Keep the `heads_per_group` most important query heads inside every KV group (GQA kept); a list
    gives one count per attention layer."""
    import torch

    sizes = _per_layer(heads_per_group, _attention_layers(loaded), "Heads per KV group")
    model, config = _copy(loaded)
    for i, keep_per_group in sizes.items():
        attn, a = blocks.attention(model.model.layers[i]), loaded.spec.layers[i].mixer
        group = a.num_heads // a.num_kv_heads
        if not 0 < keep_per_group <= group:
            raise ShrinkError(f"Heads per KV group must be between 1 and {group}, got {keep_per_group}.")
        heads = torch.cat([g * group + _top(importance.heads[i][g * group:(g + 1) * group], keep_per_group)
                           for g in range(a.num_kv_heads)])
        rows = torch.cat([torch.arange(h * a.head_dim, (h + 1) * a.head_dim) for h in heads.tolist()])
        attn.q_proj = sliced_linear(attn.q_proj, rows=rows)
        attn.o_proj = sliced_linear(attn.o_proj, cols=rows)
        attn.num_key_value_groups = keep_per_group
    _pin_head_dim(config, loaded)
    kv_heads = loaded.spec.layers[next(iter(sizes))].mixer.num_kv_heads
    config.num_attention_heads = _config_width(sizes) * kv_heads
    return _result(loaded, model, f"heads{config.num_attention_heads}")


def prune_kv_groups(loaded: Any, importance: Importance, groups: int) -> Any:
    """Keep the `groups` most important KV groups (each with all its query heads)."""
    import torch

    model, config = _copy(loaded)
    for i in _attention_layers(loaded):
        attn, a = blocks.attention(model.model.layers[i]), loaded.spec.layers[i].mixer
        if not 0 < groups <= a.num_kv_heads:
            raise ShrinkError(f"KV groups must be between 1 and {a.num_kv_heads}, got {groups}.")
        per_group = a.num_heads // a.num_kv_heads
        kept = _top(importance.kv_groups(i, a.num_kv_heads), groups).tolist()
        kv_rows = torch.cat([torch.arange(g * a.head_dim, (g + 1) * a.head_dim) for g in kept])
        q_rows = torch.cat([torch.arange(g * per_group * a.head_dim, (g + 1) * per_group * a.head_dim) for g in kept])
        attn.q_proj = sliced_linear(attn.q_proj, rows=q_rows)
        attn.k_proj = sliced_linear(attn.k_proj, rows=kv_rows)
        attn.v_proj = sliced_linear(attn.v_proj, rows=kv_rows)
        attn.o_proj = sliced_linear(attn.o_proj, cols=q_rows)
    a = loaded.spec.layers[_attention_layers(loaded)[0]].mixer
    _pin_head_dim(config, loaded)
    config.num_key_value_heads = groups
    config.num_attention_heads = groups * (a.num_heads // a.num_kv_heads)
    return _result(loaded, model, f"kv{groups}")


def prune_ssm(loaded: Any, importance: Importance, heads_per_group: int | None = None,
              head_dim: int | None = None) -> Any:
    """Group-aware Mamba2 pruning: keep `heads_per_group` heads inside every SSM group (each group
    shares its B and C, so every group keeps the same count) and the `head_dim` most important
    channels of every head. The gated RMSNorm normalises over each group's channels: its weight is
    scaled by sqrt(g / g') and its epsilon by g / g' (g channels per group before, g' after), so the
    pruned mixer computes exactly what the full one computes with the dropped channels at zero."""
    import torch

    ssm_layers = [i for i, layer in enumerate(loaded.spec.layers) if isinstance(layer.mixer, SSMSpec)]
    if not ssm_layers:
        raise ShrinkError(f"'{loaded.spec.name}' has no SSM (Mamba) layers to prune.")
    s = loaded.spec.layers[ssm_layers[0]].mixer
    per_group = s.num_heads // s.num_groups
    heads_per_group = heads_per_group or per_group
    head_dim = head_dim or s.head_dim
    if not 0 < heads_per_group <= per_group:
        raise ShrinkError(f"SSM heads per group must be between 1 and {per_group}, got {heads_per_group}.")
    if not 0 < head_dim <= s.head_dim:
        raise ShrinkError(f"SSM head_dim must be between 1 and {s.head_dim}, got {head_dim}.")
    model, config = _copy(loaded)
    channels = _top(importance.ssm_channels(), head_dim)
    inner, bc = s.num_heads * s.head_dim, 2 * s.num_groups * s.state_size
    group_ratio = (per_group * s.head_dim) / (heads_per_group * head_dim)
    for i in ssm_layers:
        mixer = blocks.ssm(model.model.layers[i])
        scores = importance.ssm_heads(i)
        heads = torch.cat([g * per_group + _top(scores[g * per_group:(g + 1) * per_group], heads_per_group)
                           for g in range(s.num_groups)])
        kept = (heads[:, None] * s.head_dim + channels[None, :]).flatten()  # channels of x, z and y
        bc_rows = inner + torch.arange(bc)
        conv_channels = torch.cat([kept, bc_rows])
        # in_proj rows: z (gate) | x, B, C (through the conv) | dt, one per head
        mixer.in_proj = sliced_linear(mixer.in_proj, rows=torch.cat([kept, inner + conv_channels, inner + inner + bc + heads]))
        mixer.conv1d = _sliced_conv(mixer.conv1d, conv_channels)
        mixer.out_proj = sliced_linear(mixer.out_proj, cols=kept)
        with torch.no_grad():
            for name in ("dt_bias", "A_log", "D"):
                setattr(mixer, name, torch.nn.Parameter(getattr(mixer, name).detach()[heads].clone()))
            mixer.norm.weight = torch.nn.Parameter(mixer.norm.weight.detach()[kept] * math.sqrt(group_ratio))
        mixer.norm.variance_epsilon *= group_ratio
        mixer.num_heads, mixer.head_dim = len(heads), head_dim
        mixer.intermediate_size = len(kept)
        mixer.conv_dim = len(conv_channels)
        mixer.norm.group_size = len(kept) // s.num_groups
    config.mamba_num_heads = heads_per_group * s.num_groups
    config.mamba_head_dim = head_dim
    return _result(loaded, model, f"ssm{config.mamba_num_heads}x{head_dim}")


def _sliced_conv(conv: Any, channels: Any) -> Any:
    """A depthwise Conv1d keeping `channels` (each channel has its own filter)."""
    import torch

    new = torch.nn.Conv1d(len(channels), len(channels), conv.kernel_size[0], groups=len(channels),
                          padding=conv.padding[0], bias=conv.bias is not None, dtype=conv.weight.dtype)
    with torch.no_grad():
        new.weight.copy_(conv.weight.detach()[channels])
        if conv.bias is not None:
            new.bias.copy_(conv.bias.detach()[channels])
    return new


def _pin_head_dim(config: Any, loaded: Any) -> None:
    # Configs without head_dim (Qwen2) derive it as hidden / heads, which head pruning would change.
    attention = _attention_layers(loaded)
    if attention:
        config.head_dim = loaded.spec.layers[attention[0]].mixer.head_dim


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
        for module in block.modules():  # the KV and SSM caches are indexed by it
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    config.num_hidden_layers = keep
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    return _result(loaded, model, f"layers{keep}")


def prune_hidden(loaded: Any, importance: Importance, hidden: int) -> Any:
    """Keep the `hidden` most important embedding channels in every tensor that touches the residual
    stream. RMSNorm averages over the channels it sees, so every hidden-size norm's weight is scaled
    by sqrt(d / d') and its epsilon by d / d': the pruned model then computes exactly what the full
    model computes with the dropped channels held at zero."""
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
        blocks.set_epsilon(module, blocks.epsilon(module) * ratio)

    embed = blocks.embedding(model)
    with torch.no_grad():
        weight = embed.weight.detach()[:, keep].clone()
        if hasattr(embed, "embed_scale"):  # Gemma multiplies by sqrt(hidden size), which shrinks with it
            weight *= scale
            embed.embed_scale.fill_(math.sqrt(hidden))
            embed.scalar_embed_scale = math.sqrt(hidden)
        embed.weight = torch.nn.Parameter(weight)
        embed.embedding_dim = hidden
    for block in model.model.layers:
        _slice_residual_io(block, keep)
        for module in blocks.hidden_norms(block):
            norm(module, scale)
        attn = blocks.attention(block)
        for module in (attn.modules() if attn is not None else ()):
            if blocks.is_norm(module):  # q/k norms (head_dim wide) keep their weight, share the epsilon
                norm(module, 1.0)
    tied = loaded.spec.tied_embeddings
    # A tied lm_head reads the embedding table, already multiplied by sqrt(d / d') for Gemma: the
    # final norm's own factor and that one cancel.
    final_factor = 1.0 if (tied and hasattr(embed, "embed_scale")) else scale
    norm(blocks.final_norm(model), final_factor)
    if tied:
        model.tie_weights()
    else:
        model.lm_head = sliced_linear(model.lm_head, cols=keep)
    config.hidden_size = hidden
    _pin_head_dim(config, loaded)
    eps_name = "rms_norm_eps" if hasattr(config, "rms_norm_eps") else "layer_norm_epsilon"
    setattr(config, eps_name, getattr(config, eps_name) * ratio)
    return _result(loaded, model, f"hidden{hidden}")


def _slice_residual_io(block: Any, keep: Any) -> None:
    """Every projection that reads the residual stream loses the dropped input columns; every one
    that writes it loses the dropped output rows."""
    reads_writes = []
    attn, mlp, ssm = blocks.attention(block), blocks.mlp(block), blocks.ssm(block)
    if attn is not None:
        reads_writes += [(attn, name, "cols") for name in ("q_proj", "k_proj", "v_proj")] + [(attn, "o_proj", "rows")]
    if mlp is not None:
        reads_writes += [(mlp, name, "cols") for name in ("gate_proj", "up_proj") if hasattr(mlp, name)]
        reads_writes.append((mlp, "down_proj", "rows"))
    if ssm is not None:
        reads_writes += [(ssm, "in_proj", "cols"), (ssm, "out_proj", "rows")]
        ssm.hidden_size = len(keep)
    for module, name, side in reads_writes:
        setattr(module, name, sliced_linear(getattr(module, name), **{side: keep}))
