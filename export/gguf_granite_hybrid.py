"""GraniteMoeHybrid (dense) in a GGUF file: llama.cpp's `granitehybrid` architecture, Mamba2 and attention
layers each followed by a SwiGLU MLP; the host of a Puzzle child whose layers mix the two
(compress/puzzle/granite.py).

The facts below follow llama.cpp (conversion/granite.py's GraniteHybridModel and its Mamba2 base, and the
granite-hybrid loader and graph); this module computes them for shrink's models.
- A layer is Mamba2 when its head_count_kv is 0; every layer has an MLP (ffn_gate/up/down) and two norms
  (attn_norm before the mixer, ffn_norm before the MLP). Hugging Face keeps gate and up as one matrix,
  gate rows first: they are split.
- The Mamba2 shape is global and its inner width must be twice the hidden size (llama.cpp asserts an
  expansion of 2). Its tensors are written as for Nemotron-H (export/gguf_nemotron_h.py): A as
  -exp(A_log), A and D as (heads, 1), the conv weight as (channels, kernel), the gated norm as (groups,
  channels per group), the small SSM tensors F32 at every --quant.
- llama.cpp's normal RoPE rotates interleaved pairs, Hugging Face's halves: q and k rows are permuted as
  for Llama. A model without RoPE (position_embedding_type "nope") is written with rope_finetuned false,
  the switch llama.cpp reads.
- Granite's multipliers become GGUF scales: attention_multiplier (the softmax scale itself),
  embedding_multiplier, residual_multiplier, and logits_scaling (llama.cpp divides the logits by it).
A model without Mamba2 layers is written as llama.cpp's plain `granite` (its hybrid memory aborts with
nothing recurrent to hold; llama.cpp's converter makes the same switch).
Refused in one sentence: experts, unequal Mamba2 shapes, an expansion other than 2, projection biases,
per-layer MLP widths or head counts, and norms whose epsilons differ.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from shrink.archspec import ArchSpec, AttentionSpec, SSMSpec
from shrink.errors import ShrinkError
from shrink.export.gguf_layout import GGUFLayout
from shrink.export.gguf_rope import write_rope

LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mamba.in_proj.weight": "ssm_in.weight",
    "mamba.conv1d.weight": "ssm_conv1d.weight",
    "mamba.conv1d.bias": "ssm_conv1d.bias",
    "mamba.dt_bias": "ssm_dt.bias",
    "mamba.A_log": "ssm_a",
    "mamba.D": "ssm_d",
    "mamba.norm.weight": "ssm_norm.weight",
    "mamba.out_proj.weight": "ssm_out.weight",
    "shared_mlp.gate.weight": "ffn_gate.weight",  # the first half of shared_mlp.input_linear (granite_hybrid_state)
    "shared_mlp.up.weight": "ffn_up.weight",
    "shared_mlp.output_linear.weight": "ffn_down.weight",
}


def granite_hybrid_layout(spec: ArchSpec) -> GGUFLayout:
    """The layout, or one sentence naming what llama.cpp's granitehybrid cannot hold."""
    ssms = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, SSMSpec)]
    attention = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, AttentionSpec)]
    if len({(s.num_heads, s.head_dim, s.num_groups, s.state_size, s.conv_kernel) for s in ssms}) > 1:
        raise ShrinkError("llama.cpp's granitehybrid has one Mamba2 shape for all Mamba layers and this model's differ.")
    if any(s.inner != 2 * spec.hidden_size for s in ssms):
        raise ShrinkError(f"llama.cpp's granitehybrid runs Mamba2 layers twice as wide as the hidden size only; this "
                          f"model's are {ssms[0].inner} wide at hidden size {spec.hidden_size}.")
    if any(s.proj_bias for s in ssms):
        raise ShrinkError("This GraniteMoeHybrid has biases on its Mamba in/out projections, which llama.cpp's "
                          "granitehybrid has no tensors for.")
    if len({(a.num_heads, a.num_kv_heads, a.head_dim) for a in attention}) > 1 or \
            len({layer.ffn.width for layer in spec.layers}) > 1:
        raise ShrinkError("llama.cpp's granitehybrid takes one attention shape and one MLP width for every layer and "
                          "this model's differ; export it as ONNX (--format onnx) instead.")
    if any(a.sliding_window or a.qk_norm or a.qkv_bias or a.o_bias or not a.owns_kv for a in attention):
        raise ShrinkError("This GraniteMoeHybrid's attention has a sliding window, q/k norms, biases or a shared KV "
                          "cache, none of which llama.cpp's granitehybrid has.")
    # without a Mamba2 layer llama.cpp's hybrid memory has nothing recurrent to hold (it aborts): the model is
    # llama.cpp's plain `granite`, as its converter also decides
    return GGUFLayout("granitehybrid" if ssms else "granite", LAYER_TENSORS, permute_qk=True, per_layer_shapes=True)


def _epsilon(model: Any) -> float:
    """llama.cpp's one RMSNorm epsilon (block norms, final norm, Mamba gated norms alike)."""
    norms = [model.model.norm] + [n for layer in model.model.layers
                                  for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                            getattr(getattr(layer, "mamba", None), "norm", None)) if n is not None]
    found = {float(getattr(n, "variance_epsilon", getattr(n, "eps", 0.0))) for n in norms}
    if len(found) > 1:
        raise ShrinkError(f"This GraniteMoeHybrid's norms use different epsilons ({', '.join(f'{e:.3g}' for e in sorted(found))}) "
                          "and llama.cpp has one.")
    return found.pop()


def granite_hybrid_state(loaded: Any, state: dict[str, np.ndarray], planned: dict) -> dict[str, np.ndarray]:
    """The Hugging Face state dict with every tensor in the shape and values llama.cpp's granitehybrid reads;
    `planned` (a quantized model's grid per tensor) follows the split of gate and up (by rows, so whole
    blocks stay in either half)."""
    model, config = loaded.model, loaded.model.config
    if getattr(config, "hidden_act", "silu") != "silu":
        raise ShrinkError(f"This GraniteMoeHybrid's MLP uses '{config.hidden_act}' and llama.cpp's granitehybrid SiLU only.")
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        joined = state.pop(p + "shared_mlp.input_linear.weight")
        state[p + "shared_mlp.gate.weight"], state[p + "shared_mlp.up.weight"] = np.split(joined, 2)
        if p + "shared_mlp.input_linear.weight" in planned:
            planned[p + "shared_mlp.gate.weight"] = planned[p + "shared_mlp.up.weight"] = \
                planned.pop(p + "shared_mlp.input_linear.weight")
        if getattr(layer, "mamba", None) is None:
            continue
        p += "mamba."
        conv = state[p + "conv1d.weight"]
        state[p + "conv1d.weight"] = conv.reshape(conv.shape[0], conv.shape[-1])
        state.setdefault(p + "conv1d.bias", np.zeros(conv.shape[0], np.float32))  # llama.cpp always adds one
        state[p + "A_log"] = -np.exp(state[p + "A_log"].astype(np.float64)).astype(np.float32).reshape(-1, 1)
        state[p + "D"] = state[p + "D"].reshape(-1, 1)
        state[p + "norm.weight"] = state[p + "norm.weight"].reshape(layer.mamba.n_groups, -1)
    return state


def write_granite_hybrid_metadata(writer: Any, spec: ArchSpec, config: Any, loaded: Any) -> None:
    attention = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, AttentionSpec)]
    heads = attention[0].num_heads if attention else int(config.num_attention_heads)
    head_dim = attention[0].head_dim if attention else spec.hidden_size // heads
    writer.add_name(Path(str(loaded.source)).name or loaded.source)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 4096)))
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_vocab_size(spec.vocab_size)
    ssms = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, SSMSpec)]
    writer.add_head_count(heads)
    writer.add_head_count_kv([layer.mixer.num_kv_heads if isinstance(layer.mixer, AttentionSpec) else 0
                              for layer in spec.layers] if ssms else attention[0].num_kv_heads)  # 0: a Mamba2 layer
    writer.add_feed_forward_length(spec.layers[0].ffn.width)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(_epsilon(loaded.model))
    if getattr(config, "position_embedding_type", "rope") == "rope":
        write_rope(writer, "granitehybrid" if ssms else "granite", config, head_dim)
    else:
        writer.add_rope_scaling_finetuned(False)
    writer.add_attention_scale(float(config.attention_multiplier))
    writer.add_embedding_scale(float(config.embedding_multiplier))
    writer.add_residual_scale(float(config.residual_multiplier))
    writer.add_logit_scale(float(config.logits_scaling))
    if not ssms:  # llama.cpp's plain granite
        return
    ssm = ssms[0]
    writer.add_ssm_conv_kernel(ssm.conv_kernel)
    writer.add_ssm_state_size(ssm.state_size)
    writer.add_ssm_group_count(ssm.num_groups)
    writer.add_ssm_inner_size(ssm.inner)
    writer.add_ssm_time_step_rank(ssm.num_heads)
