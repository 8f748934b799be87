"""Puzzle's no-op and linear blocks (blockvariants.py) as llama.cpp's `deci` architecture runs them.

What llama.cpp 0.3.36's deci does with each kind of layer (checked by running tiny models against
PyTorch, tests/test_export_variants.py):
- n_head 0: no attention; the layer's input goes straight to its FFN. attn_norm and the q/k/v/o
  tensors are not loaded, and a file holding them is refused (llama.cpp counts the tensors it read).
  But llama.cpp sizes every head (key_length, RoPE dimensions) only when layer 0 has heads: with
  n_head 0 there the model fails to load.
- n_head > 0, n_head_kv 0: linear attention, attn_output applied to attn_norm(x), added to x; no KV.
- n_ff 0: the graph skips the rest of the layer, its attention's residual sum included, so only a
  layer that also has no attention (a layer that passes its input through) computes what PyTorch
  does; in the last layer n_ff 0 aborts the process.
- an FFN is gate/up/down or nothing: a linear FFN has no form (gguf_layout refuses it).
Where deci's own form would compute something else, the layer is written as an exact stand-in with
zero weights: layer 0 without attention as linear attention with a zero attn_output, and a layer with
attention but no FFN (or the last layer) as an FFN of width 1 with zero weights. Each adds at most one
hidden x hidden matmul and is listed in the export's notes.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from shrink.archspec import ArchSpec, AttentionSpec, FFNSpec, LinearSpec

STAND_IN_FFN = 1  # width of the zero FFN that stands in for none where deci's n_ff 0 would drop the attention


def deci_heads(mixer: Any, linear_heads: int) -> tuple[int, int]:
    """(n_head, n_head_kv) of a layer as deci reads them: n_head 0 is no attention, n_head_kv 0 with
    n_head > 0 linear attention (the head count only has to be positive there: it shapes nothing)."""
    if isinstance(mixer, AttentionSpec):
        return mixer.num_heads, mixer.num_kv_heads
    return (linear_heads, 0) if isinstance(mixer, LinearSpec) else (0, 0)


def deci_layers(spec: ArchSpec, state: dict[str, np.ndarray], notes: list[str]) -> ArchSpec:
    """Rewrite `state` (Hugging Face names -> float32 arrays) into the tensors deci loads for each layer and
    return the spec the file's metadata must describe (stand-ins included)."""
    hidden, last = spec.hidden_size, spec.num_layers - 1
    layers, dropped, stand_ins = list(spec.layers), 0, []
    for i, layer in enumerate(spec.layers):
        prefix = f"model.layers.{i}."
        if layer.mixer is None and i == 0:
            state[prefix + "self_attn.o_proj.weight"] = np.zeros((hidden, hidden), np.float32)
            layers[i] = replace(layers[i], mixer=LinearSpec())
            stand_ins.append("layer 0's missing attention as a zero linear attention (llama.cpp sizes heads from layer 0)")
        elif layer.mixer is None:
            dropped += state.pop(prefix + "input_layernorm.weight", None) is not None
        if layer.ffn is None and (layers[i].mixer is not None or i == last):
            state[prefix + "mlp.gate_proj.weight"] = np.zeros((STAND_IN_FFN, hidden), np.float32)
            state[prefix + "mlp.up_proj.weight"] = np.zeros((STAND_IN_FFN, hidden), np.float32)
            state[prefix + "mlp.down_proj.weight"] = np.zeros((hidden, STAND_IN_FFN), np.float32)
            layers[i] = replace(layers[i], ffn=FFNSpec("gated", STAND_IN_FFN))
            stand_ins.append(f"layer {i}'s missing FFN as a zero FFN of width {STAND_IN_FFN} (deci's n_ff 0 would drop "
                             "the layer's attention, or abort in the last layer)")
        elif layer.ffn is None:
            dropped += state.pop(prefix + "post_attention_layernorm.weight", None) is not None
    if dropped:
        notes.append(f"{dropped} norm weights of no-op blocks not written: deci does not read them and in PyTorch "
                     "their block ignores them")
    notes += [f"written with zero weights, same outputs: {s}" for s in stand_ins]
    return replace(spec, layers=tuple(layers))
