"""Nemotron-H in a GGUF file: llama.cpp's `nemotron_h` architecture (Mamba2, attention and ReLU² MLP blocks).

The facts below follow llama.cpp (convert_hf_to_gguf.py's NemotronHModel and its Mamba2 base, and the
nemotron_h loader and graph); this module computes them for shrink's own, possibly pruned, models.
- A block holds one mixer. llama.cpp tells the kinds apart by two per-layer arrays: a Mamba layer has
  head_count_kv 0 and feed_forward_length 0, an attention layer head_count_kv > 0 and
  feed_forward_length 0, an MLP layer feed_forward_length > 0. Per-layer attention heads and MLP widths
  (pruned models) therefore export as they are.
- The Mamba2 shape is global (ssm.inner_size, state_size, group_count, time_step_rank = SSM heads,
  conv_kernel): every Mamba layer must have the same one.
- Tensors: in_proj -> ssm_in (rows z | x B C | dt, the same order in both), the depthwise conv weight
  squeezed to (channels, kernel), A stored as -exp(A_log) and D, both as (heads, 1), dt_bias ->
  ssm_dt.bias, the gated RMSNorm weight as (groups, channels per group), out_proj -> ssm_out. Those
  four small SSM tensors stay F32 whatever --quant is (llama.cpp's converter and kernels keep them so).
- No RoPE (the attention is position-free) and scale 1/sqrt(head_dim), as in Hugging Face.
- One RMSNorm epsilon for every norm. Pruning rescales epsilons (compress/prune.py), so the Mamba gated
  norms and the block norms can disagree; then the residual stream is scaled by c = sqrt(eps_ssm /
  eps_block) (the embedding and every block's output projection by c, the output projection written
  untied): each block norm then computes x / sqrt(mean(x²) + eps_block) exactly, with eps_ssm written.
Not represented: Hugging Face clamps softplus(dt) below at time_step_min (1e-3) and llama.cpp does not
clamp; a step that small contributes almost nothing to the state in either. MoE blocks (llama.cpp's
separate `nemotron_h_moe`) are refused.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from shrink.archspec import ArchSpec, AttentionSpec, SSMSpec
from shrink.errors import ShrinkError
from shrink.export.gguf_layout import GGUFLayout

# Hugging Face suffix inside model.layers.N -> GGUF suffix in blk.N (the mixers' submodule names differ,
# so one table serves the three kinds of block)
LAYER_TENSORS = {
    "norm.weight": "attn_norm.weight",
    "mixer.in_proj.weight": "ssm_in.weight",
    "mixer.conv1d.weight": "ssm_conv1d.weight",
    "mixer.conv1d.bias": "ssm_conv1d.bias",
    "mixer.dt_bias": "ssm_dt.bias",
    "mixer.A_log": "ssm_a",
    "mixer.D": "ssm_d",
    "mixer.norm.weight": "ssm_norm.weight",
    "mixer.out_proj.weight": "ssm_out.weight",
    "mixer.q_proj.weight": "attn_q.weight",
    "mixer.k_proj.weight": "attn_k.weight",
    "mixer.v_proj.weight": "attn_v.weight",
    "mixer.o_proj.weight": "attn_output.weight",
    "mixer.up_proj.weight": "ffn_up.weight",
    "mixer.up_proj.bias": "ffn_up.bias",
    "mixer.down_proj.weight": "ffn_down.weight",
    "mixer.down_proj.bias": "ffn_down.bias",
}
# GGUF names (suffixes) of the 2-D SSM tensors that stay F32 at every --quant
KEEP_F32 = ("ssm_conv1d.weight", "ssm_a", "ssm_d", "ssm_norm.weight")
# the projections that write into the residual stream, scaled with it
_RESIDUAL_WRITERS = ("mixer.out_proj.", "mixer.o_proj.", "mixer.down_proj.")


def nemotron_h_layout(spec: ArchSpec, pad_to_uniform: bool) -> GGUFLayout:
    """The layout, or one sentence naming what llama.cpp's nemotron_h cannot hold."""
    moe = [i for i, layer in enumerate(spec.layers) if layer.ffn is not None and layer.ffn.is_moe]
    if moe:
        raise ShrinkError(f"Nemotron-H blocks {moe} are mixture-of-experts, which llama.cpp runs as a separate "
                          "'nemotron_h_moe' architecture that shrink does not export yet.")
    shapes = sorted({_ssm_shape(layer.mixer) for layer in spec.layers if isinstance(layer.mixer, SSMSpec)})
    if len(shapes) > 1:
        raise ShrinkError(f"llama.cpp's nemotron_h has one Mamba2 shape (heads, head_dim, groups, state, kernel) for "
                          f"all Mamba layers and this model's differ ({', '.join(map(str, shapes))}); prune every "
                          "Mamba layer alike.")
    if any(layer.mixer.proj_bias for layer in spec.layers if isinstance(layer.mixer, SSMSpec)):
        raise ShrinkError("This Nemotron-H has biases on its Mamba in/out projections, which llama.cpp's nemotron_h "
                          "has no tensors for.")
    attention = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, AttentionSpec)]
    if len({a.head_dim for a in attention}) > 1:
        raise ShrinkError("llama.cpp's nemotron_h has one attention head_dim for all layers and this model's differ.")
    if any(a.sliding_window or a.qk_norm or a.qkv_bias or a.o_bias or not a.owns_kv for a in attention):
        raise ShrinkError("This Nemotron-H's attention has a sliding window, q/k norms, biases or a shared KV cache, "
                          "none of which llama.cpp's nemotron_h has.")
    # pad_to_uniform: nothing to pad, llama.cpp's nemotron_h takes per-layer MLP widths and head counts as they are
    return GGUFLayout("nemotron_h", LAYER_TENSORS, per_layer_shapes=True)


def _ssm_shape(ssm: SSMSpec) -> tuple[int, ...]:
    return ssm.num_heads, ssm.head_dim, ssm.num_groups, ssm.state_size, ssm.conv_kernel


def _mamba_mixers(model: Any) -> dict[int, Any]:
    return {i: block.mixer for i, block in enumerate(model.model.layers) if hasattr(block.mixer, "A_log")}


def norm_epsilons(model: Any) -> tuple[float, float]:
    """(the one epsilon written, the residual-stream scale that makes it exact for every norm)."""
    hidden = {float(block.norm.variance_epsilon) for block in model.model.layers}
    hidden.add(float(model.model.norm_f.variance_epsilon))
    gated = {float(mixer.norm.variance_epsilon) for mixer in _mamba_mixers(model).values()}
    if len(hidden) > 1 or len(gated) > 1:
        raise ShrinkError("This Nemotron-H's norms use different epsilons from layer to layer "
                          f"({', '.join(f'{e:.3g}' for e in sorted(hidden | gated))}) and llama.cpp has one.")
    block = hidden.pop()
    ssm = gated.pop() if gated else block
    if math.isclose(ssm, block, rel_tol=1e-6):
        return block, 1.0
    return ssm, math.sqrt(ssm / block)


def nemotron_h_state(loaded: Any, state: dict[str, np.ndarray], planned: dict, notes: list[str]) -> dict[str, np.ndarray]:
    """The Hugging Face state dict with every tensor in the shape and values llama.cpp's nemotron_h reads."""
    model, config = loaded.model, loaded.model.config
    head = model.get_output_embeddings()
    if "lm_head.weight" not in state and head is not None and head.weight is not model.get_input_embeddings().weight:
        # transformers never ties Nemotron-H's output to its embedding, whatever tie_word_embeddings says
        state["lm_head.weight"] = head.weight.detach().float().cpu().numpy()
    for key, allowed in (("mlp_hidden_act", "relu2"), ("mamba_hidden_act", "silu")):
        if getattr(config, key, allowed) != allowed:
            raise ShrinkError(f"This Nemotron-H uses {key}='{getattr(config, key)}', and llama.cpp's nemotron_h "
                              f"computes '{allowed}' only.")
    for i, mixer in _mamba_mixers(model).items():
        p = f"model.layers.{i}.mixer."
        inner = mixer.out_proj.in_features
        groups = inner // mixer.norm.group_size
        if groups != mixer.n_groups:
            raise ShrinkError(f"Layer {i}'s gated norm has {groups} groups and its B/C {mixer.n_groups}; llama.cpp's "
                              "nemotron_h uses one group count for both.")
        conv = state[p + "conv1d.weight"]
        state[p + "conv1d.weight"] = conv.reshape(conv.shape[0], conv.shape[-1])
        state.setdefault(p + "conv1d.bias", np.zeros(conv.shape[0], np.float32))  # llama.cpp always adds one
        state[p + "A_log"] = -np.exp(state[p + "A_log"].astype(np.float64)).astype(np.float32).reshape(-1, 1)
        state[p + "D"] = state[p + "D"].reshape(-1, 1)
        state[p + "norm.weight"] = state[p + "norm.weight"].reshape(groups, -1)
    scale = norm_epsilons(model)[1]
    if scale != 1.0:
        _scale_residual_stream(state, scale, planned, notes)
    return state


def _scale_residual_stream(state: dict[str, np.ndarray], scale: float, planned: dict, notes: list[str]) -> None:
    scaled = ["model.embeddings.weight"] + [name for name in state if name.startswith("model.layers.")
                                             and any(w in name for w in _RESIDUAL_WRITERS)]
    if any(name in planned for name in scaled):
        raise ShrinkError("This quantized Nemotron-H's Mamba norms and block norms use different epsilons, which "
                          "llama.cpp's single epsilon can only match by rescaling weights off their quantization "
                          "grid; export it before `shrink quantize` and quantize the GGUF instead.")
    if "lm_head.weight" not in state:  # tied: the output projection keeps the unscaled table
        state["lm_head.weight"] = state["model.embeddings.weight"].copy()
    for name in scaled:
        state[name] = state[name] * np.float32(scale)
    notes.append(f"The Mamba gated norms' epsilon differs from the block norms' (pruning rescales them) and llama.cpp "
                 f"has one: the residual stream is scaled by {scale:.6g} (embedding and block output projections; "
                 "the output projection written untied), which makes every norm compute as in PyTorch.")


def write_nemotron_h_metadata(writer: Any, spec: ArchSpec, config: Any, loaded: Any) -> None:
    attention = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, AttentionSpec)]
    heads = [a.num_heads for a in attention] or [int(config.num_attention_heads)]
    head_dim = attention[0].head_dim if attention else int(config.head_dim)
    writer.add_name(Path(str(loaded.source)).name or loaded.source)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 4096)))
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_vocab_size(spec.vocab_size)
    # Non-attention layers repeat the first attention layer's head count (llama.cpp reads the head size
    # only when layer 0's count is non-zero, and uses a layer's count only in attention layers).
    if len(set(heads)) == 1:
        writer.add_head_count(heads[0])
    else:
        writer.add_head_count([layer.mixer.num_heads if isinstance(layer.mixer, AttentionSpec) else heads[0]
                               for layer in spec.layers])
    writer.add_head_count_kv([layer.mixer.num_kv_heads if isinstance(layer.mixer, AttentionSpec) else 0
                              for layer in spec.layers])
    writer.add_feed_forward_length([layer.ffn.width if layer.ffn is not None else 0 for layer in spec.layers])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    # the llama.cpp in llama-cpp-python 0.3.36 requires the plain layer-norm key for nemotron_h; both hold the one
    # epsilon
    eps = norm_epsilons(loaded.model)[0]
    writer.add_layer_norm_rms_eps(eps)
    writer.add_layer_norm_eps(eps)
    ssms = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, SSMSpec)]
    ssm = ssms[0] if ssms else SSMSpec(int(config.mamba_num_heads), int(config.mamba_head_dim), int(config.n_groups),
                                       int(config.ssm_state_size), int(config.conv_kernel))
    writer.add_ssm_conv_kernel(ssm.conv_kernel)
    writer.add_ssm_state_size(ssm.state_size)
    writer.add_ssm_group_count(ssm.num_groups)
    writer.add_ssm_inner_size(ssm.inner)
    writer.add_ssm_time_step_rank(ssm.num_heads)
