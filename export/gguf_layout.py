"""How each supported family is laid out in a GGUF file: llama.cpp's architecture name, tensor
names, norm and RoPE conventions, and per-family metadata.

llama.cpp's converter (convert_hf_to_gguf.py) is the authority these tables follow:
- Llama (and Deci) use llama.cpp's "normal" RoPE, which rotates interleaved pairs, while Hugging
  Face rotates halves: q and k rows are permuted so both compute the same thing.
- Qwen2, Qwen3 and Gemma 3 use the "neox" RoPE, the same as Hugging Face: no permutation.
- Gemma stores every RMSNorm weight as 1 + w (Hugging Face keeps w and adds 1 at run time).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shrink.archspec import ArchSpec, LinearSpec
from shrink.errors import ShrinkError

_ATTENTION = {
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.bias": "attn_output.bias",
}
_GATED_FFN = {
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.bias": "ffn_down.bias",
}
_LLAMA_NORMS = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight"}
_QK_NORMS = {"self_attn.q_norm.weight": "attn_q_norm.weight", "self_attn.k_norm.weight": "attn_k_norm.weight"}
_GEMMA3_NORMS = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
}
MODEL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.embeddings.weight": "token_embd.weight",  # Nemotron-H
    "model.norm_f.weight": "output_norm.weight",  # Nemotron-H
}


@dataclass(frozen=True)
class GGUFLayout:
    arch: str  # llama.cpp architecture name
    layer_tensors: dict[str, str]  # Hugging Face suffix inside model.layers.N -> GGUF suffix in blk.N
    permute_qk: bool = False
    norm_offset: float = 0.0
    per_layer_shapes: bool = False  # deci: head counts and FFN widths are arrays
    extra: dict[str, Any] = field(default_factory=dict)


LAYOUTS = {
    "llama": GGUFLayout("llama", {**_ATTENTION, **_GATED_FFN, **_LLAMA_NORMS}, permute_qk=True),
    "deci": GGUFLayout("deci", {**_ATTENTION, **_GATED_FFN, **_LLAMA_NORMS}, permute_qk=True, per_layer_shapes=True),
    "qwen2": GGUFLayout("qwen2", {**_ATTENTION, **_GATED_FFN, **_LLAMA_NORMS}),
    "qwen3": GGUFLayout("qwen3", {**_ATTENTION, **_GATED_FFN, **_LLAMA_NORMS, **_QK_NORMS}),
    "gemma3": GGUFLayout("gemma3", {**_ATTENTION, **_GATED_FFN, **_GEMMA3_NORMS, **_QK_NORMS}, norm_offset=1.0),
}
# ArchSpec family -> layout for a uniform model; non-uniform Llama-shaped models go to deci.
_FAMILY_LAYOUT = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3"}
# deci is Llama's graph per layer: Qwen2 fits too (the same RoPE once q/k are permuted, and deci loads q/k/v
# biases and ties the output to the embedding when output.weight is absent: checked in llama.cpp,
# tests/test_export_variants.py); Qwen3's q/k norms and Gemma 3's extra norms it does not load.
LLAMA_SHAPED = {"llama", "mistral", "qwen2"}


def choose_layout(spec: ArchSpec, pad_to_uniform: bool) -> GGUFLayout:
    """The layout llama.cpp can run this spec with, or a one-sentence refusal naming the way out."""
    check_no_shared_kv(spec)
    if spec.family == "nemotron_h":
        # imported here: that module imports this one
        from shrink.export.gguf_nemotron_h import nemotron_h_layout

        return nemotron_h_layout(spec, pad_to_uniform)
    if spec.family == "granitemoehybrid":
        from shrink.export.gguf_granite_hybrid import granite_hybrid_layout  # imports this module too

        return granite_hybrid_layout(spec)
    if spec.family not in _FAMILY_LAYOUT:
        raise ShrinkError(
            f"GGUF export of the '{spec.family}' family is not supported; export it as ONNX (--format onnx) instead."
        )
    variants = has_variants(spec)
    if variants and spec.family in LLAMA_SHAPED:
        _check_deci_variants(spec)
        return LAYOUTS["deci"]
    if variants:
        raise ShrinkError(
            f"llama.cpp runs no-op and linear blocks only in Llama-shaped models (its 'deci' architecture, the one "
            f"with per-layer shapes), so this {spec.family} model with no-op or linear blocks cannot be a GGUF; export "
            f"it as ONNX (--format onnx) instead."
        )
    if any(layer.mixer_kind != "attention" or layer.ffn is None for layer in spec.layers):
        raise ShrinkError("GGUF export needs attention and an FFN in every layer; export it as ONNX instead.")
    if spec.family == "gemma3":
        _check_gemma3_window_pattern(spec)
    if spec.is_uniform or pad_to_uniform:
        return LAYOUTS[_FAMILY_LAYOUT[spec.family]]
    if spec.family in LLAMA_SHAPED:
        return LAYOUTS["deci"]
    raise ShrinkError(
        f"llama.cpp builds per-layer shapes only for Llama-shaped models (its 'deci' architecture), so this "
        f"non-uniform {spec.family} model cannot be a GGUF: prune it uniformly, export it as ONNX (--format onnx), "
        f"or pass --pad-to-uniform (zero padding: same outputs, no speed gain)."
    )


def _check_gemma3_window_pattern(spec: ArchSpec) -> None:
    # llama.cpp derives Gemma 3's local/global layers from a fixed pattern: every 6th layer is global, so a
    # depth-pruned Gemma 3 whose kept layers break it would run with the wrong attention in llama.cpp
    expected = [None if (i + 1) % 6 == 0 else "local" for i in range(spec.num_layers)]
    actual = [None if layer.mixer.sliding_window is None else "local" for layer in spec.layers]
    if actual != expected:
        raise ShrinkError("This Gemma 3 model's sliding-window layers do not follow the 5-local / 1-global pattern "
                          "llama.cpp assumes (depth pruning removed layers out of it); export it as ONNX instead.")


# llama.cpp shares a KV cache only where an architecture defines it, as a suffix of layers reading earlier ones
# (gemma3n, gemma4 in llama-model.cpp); no GGUF key says "layer i reads layer j's cache" for Llama or Gemma 3.
SHARED_KV_REFUSAL = ("llama.cpp shares a KV cache between layers only inside architectures built for it (gemma3n, "
                     "gemma4) and no GGUF key expresses it for {family}, so a {family} model whose layers read another "
                     "layer's cache (cross-layer KV sharing) cannot be a GGUF; export it as ONNX (--format onnx) instead.")


SINGLE_INPUT_KV_REFUSAL = ("llama.cpp computes every layer's keys and values from that layer's own input, so a {family} "
                           "model whose layers from {k} on take them from layer {k}'s input (SwiftKV's SingleInputKV) "
                           "cannot be a GGUF; export it as ONNX (--format onnx) instead.")


def check_no_shared_kv(spec: ArchSpec) -> None:
    """Refuse a spec with cross-layer KV sharing (compress/kvshare.py) or SingleInputKV
    (compress/swiftkv.py): no llama.cpp layout expresses either."""
    if any(getattr(layer.mixer, "kv_source", None) is not None for layer in spec.layers):
        raise ShrinkError(SHARED_KV_REFUSAL.format(family=spec.family))
    if spec.single_input_kv is not None:
        raise ShrinkError(SINGLE_INPUT_KV_REFUSAL.format(family=spec.family, k=spec.single_input_kv))


def has_variants(spec: ArchSpec) -> bool:
    """Whether any layer holds a Puzzle variant (blockvariants.py): no attention, a linear mixer, no FFN
    or a linear FFN."""
    return any(layer.mixer_kind in ("none", "linear") or layer.ffn is None or isinstance(layer.ffn, LinearSpec)
               for layer in spec.layers)


def _check_deci_variants(spec: ArchSpec) -> None:
    """deci runs no attention, linear attention and no FFN (export/gguf_deci.py says how), but an FFN only
    as gate/up/down or nothing: a linear FFN has no GGUF form."""
    linear = [i for i, layer in enumerate(spec.layers) if isinstance(layer.ffn, LinearSpec)]
    if linear:
        raise ShrinkError(
            f"llama.cpp's 'deci' architecture has no linear FFN (it runs gate/up/down FFNs or none), so the linear FFN "
            f"of layer {', '.join(map(str, linear))} cannot be a GGUF; export it as ONNX (--format onnx) instead."
        )


def gguf_tensor_name(hf_name: str, layout: GGUFLayout) -> str:
    if hf_name in MODEL_TENSORS:
        return MODEL_TENSORS[hf_name]
    parts = hf_name.split(".")
    if len(parts) > 3 and parts[0] == "model" and parts[1] == "layers":
        suffix = ".".join(parts[3:])
        if suffix in layout.layer_tensors:
            return f"blk.{parts[2]}.{layout.layer_tensors[suffix]}"
    raise ShrinkError(f"Tensor '{hf_name}' has no place in a '{layout.arch}' GGUF; refusing to drop it silently.")

