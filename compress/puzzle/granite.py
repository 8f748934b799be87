"""A Llama-family model rewritten as transformers' GraniteMoeHybrid: the Hugging Face model that can hold a
Puzzle child whose layers mix attention with Mamba2 mixers, and the one llama.cpp's `granitehybrid`
architecture reads.

GraniteMoeHybrid is Llama-shaped where the two overlap: RMSNorm before the mixer and before the MLP,
residual adds, SwiGLU, grouped-query attention with RoPE (when position_embedding_type is "rope"). Its
extra multipliers are 1 for a converted Llama, except attention_multiplier, which is the softmax scale
itself (Llama's 1/sqrt(head_dim)); its dense MLP (no experts: num_local_experts 0) keeps gate and up as
one matrix, gate first. A layer of type "linear_attention" holds a Mamba2 mixer instead of attention.
"""

from __future__ import annotations

from typing import Any

from shrink.archspec import AttentionSpec
from shrink.errors import ShrinkError

SOURCES = ("llama", "mistral")  # no QK norms, no sliding windows: what GraniteMoeHybrid's attention computes
ATTENTION, MAMBA = "full_attention", "linear_attention"  # GraniteMoeHybrid's layer types
# the Mamba2 mixer a Puzzle variant gets: a head per attention head over twice the hidden width (llama.cpp's
# granitehybrid runs an expansion of 2 only), one group, state 64, a 4-wide convolution
MAMBA_EXPAND, MAMBA_GROUPS, MAMBA_STATE, MAMBA_CONV = 2, 1, 64, 4


def granite_config(config: Any, layer_types: list[str] | None = None) -> Any:
    """The GraniteMoeHybrid config of a Llama-family `config`, every layer attention unless `layer_types`
    says otherwise; Mamba2 mixers take a head per attention head over twice the hidden width."""
    from transformers import GraniteMoeHybridConfig

    if config.model_type not in SOURCES:
        raise ShrinkError(f"A GraniteMoeHybrid host is built from {', '.join(SOURCES)} models, not '{config.model_type}'.")
    if getattr(config, "sliding_window", None):
        raise ShrinkError("GraniteMoeHybrid's attention has no sliding window; this model's layers slide.")
    layers = config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    layer_types = layer_types or [ATTENTION] * layers
    if len(layer_types) != layers or set(layer_types) - {ATTENTION, MAMBA}:
        raise ShrinkError(f"layer_types lists {layers} layers, each '{ATTENTION}' or '{MAMBA}'; got {layer_types}.")
    return GraniteMoeHybridConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        shared_intermediate_size=config.intermediate_size, num_hidden_layers=layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=head_dim, hidden_act=config.hidden_act, max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps, rope_parameters=dict(config.rope_parameters),
        position_embedding_type="rope", attention_bias=config.attention_bias, attention_dropout=0.0,
        attention_multiplier=head_dim ** -0.5, embedding_multiplier=1.0, residual_multiplier=1.0,
        logits_scaling=1.0, num_local_experts=0, layer_types=list(layer_types),
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id, pad_token_id=getattr(config, "pad_token_id", None),
        mamba_n_heads=config.num_attention_heads, mamba_n_groups=MAMBA_GROUPS, mamba_d_state=MAMBA_STATE,
        mamba_d_conv=MAMBA_CONV, mamba_expand=MAMBA_EXPAND)


def hosts_mamba2(spec: Any) -> bool:
    """Whether a Llama-family spec can become a GraniteMoeHybrid (so a layer may take a Mamba2 mixer)."""
    return spec.family in SOURCES and all(
        isinstance(l.mixer, AttentionSpec) and not l.mixer.sliding_window and not l.mixer.qkv_bias and
        not l.mixer.o_bias and l.mixer.num_heads * l.mixer.head_dim == spec.hidden_size and
        l.ffn is not None and not l.ffn.bias for l in spec.layers)  # GraniteMoeHybrid's MLP has no biases


def mamba_mixer(config: Any, layer_idx: int) -> Any:
    """A fresh GraniteMoeHybrid Mamba2 layer for layer `layer_idx` of a Llama-family model with `config`."""
    from transformers.models.granitemoehybrid.modeling_granitemoehybrid import GraniteMoeHybridMambaLayer

    layer_types = [ATTENTION] * config.num_hidden_layers
    layer_types[layer_idx] = MAMBA
    return GraniteMoeHybridMambaLayer(granite_config(config, layer_types), layer_idx)


def granite_from_llama(model: Any, layer_types: list[str] | None = None) -> Any:
    """A GraniteMoeHybridForCausalLM computing what the Llama-family `model` computes in its attention
    layers (the same weights; gate and up joined); layers typed Mamba keep a fresh Mamba2 mixer, trained
    afterwards (Puzzle's blockwise distillation)."""
    import torch
    from transformers import GraniteMoeHybridForCausalLM

    config = granite_config(model.config, layer_types)
    granite = GraniteMoeHybridForCausalLM(config).to(model.dtype).eval()
    with torch.no_grad():
        granite.model.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
        granite.model.norm.weight.copy_(model.model.norm.weight)
        if not config.tie_word_embeddings:
            granite.lm_head.weight.copy_(model.lm_head.weight)
        for source, layer, kind in zip(model.model.layers, granite.model.layers, config.layer_types):
            layer.input_layernorm.weight.copy_(source.input_layernorm.weight)
            layer.post_attention_layernorm.weight.copy_(source.post_attention_layernorm.weight)
            mlp = source.mlp
            layer.shared_mlp.input_linear.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
            layer.shared_mlp.output_linear.weight.copy_(mlp.down_proj.weight)
            if kind == ATTENTION:
                layer.self_attn.load_state_dict(source.self_attn.state_dict())
    return granite
