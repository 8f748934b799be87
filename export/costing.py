"""What an export will store, as an ArchSpec the roofline costs: the one rule the planner, the budget
check and `shrink estimate` share with the exporters, so that what is costed is what is written.

Per runtime (the rules live in the exporters; each line names where):
- GGUF (export/gguf.py): block weights in the family's stored format, an operator whose rows do not
  divide into its blocks in the registry's fallback; token embedding and output on at least 8 bits
  (Q8_0 below that); norms f32; activations int8 for quantized dot products (llama.cpp quantizes them
  on the fly), f32 otherwise; KV cache f16.
- ONNX (export/onnx.py): MatMulNBits block weights; the gather table stays f32; a quantized export
  unties a tied lm_head into its own initializer, quantized like the blocks for `shrink export
  --quant`, f32 for a student whose plan keeps it (every planned run); activations and KV f32.
"""

from __future__ import annotations

from dataclasses import replace

from shrink.archspec import ArchSpec, AttentionSpec, Formats, SSMSpec
from shrink.errors import ShrinkError
from shrink.numformats.registry import (FAMILIES, FORMATS, NumberFormat, fallback_chain, resolve_weights, stored_format,
                                        vocabulary_format)


def op_row_lengths(spec: ArchSpec) -> dict[str, set[int]]:
    """Per roofline operator, the row lengths (input features) of the weights it reads, over all layers."""
    rows: dict[str, set[int]] = {}
    for layer in spec.layers:
        m, f = layer.mixer, layer.ffn
        if isinstance(m, AttentionSpec):
            rows.setdefault("attn.qkv", set()).add(spec.hidden_size)
            rows.setdefault("attn.o", set()).add(m.num_heads * m.head_dim)
        elif isinstance(m, SSMSpec):
            rows.setdefault("ssm.in_proj", set()).add(spec.hidden_size)
            rows.setdefault("ssm.out_proj", set()).add(m.inner)
        if f is not None and not f.is_moe:
            rows.setdefault("ffn.up", set()).add(spec.hidden_size)
            rows.setdefault("ffn.down", set()).add(f.width)
    return rows


def fitting_format(wanted: NumberFormat, rows: set[int]) -> NumberFormat:
    """The first format of `wanted`'s fallback chain whose blocks divide every row length."""
    for name in fallback_chain(wanted.name):
        if all(r % FORMATS[name].block == 0 for r in rows):
            return FORMATS[name]
    raise ShrinkError(f"Rows of {sorted(rows)} divide into no format after {wanted.name}.")


def fallbacks(spec: ArchSpec, weights: NumberFormat) -> dict[str, NumberFormat]:
    """Operators whose weights cannot take `weights` and the format they take instead."""
    found = {}
    for op, rows in op_row_lengths(spec).items():
        chosen = fitting_format(weights, rows)
        if chosen is not weights:
            found[op] = chosen
    return found


def costed_spec(spec: ArchSpec, family: str | None, runtime: str, *, lm_head_kept: bool = True) -> ArchSpec:
    """`spec` with the formats an export of `family` (or of one stored format) to `runtime` stores.
    lm_head_kept: an ONNX student keeps its lm_head in f32 (a plan's default); False for `shrink export`."""
    weights = stored_format(family, runtime) if family is None or family in FAMILIES else resolve_weights(family, runtime)
    ops = tuple((op, f.name) for op, f in fallbacks(spec, weights).items())
    if runtime == "gguf":
        formats = Formats(weights=weights.name, embeddings=vocabulary_format(weights, "gguf").name,
                          activations="int8" if weights.quantized else "fp32", kv_cache="fp16", other="fp32", ops=ops)
        return replace(spec, formats=formats.validated())
    if runtime == "onnx":
        lm_head = None
        if weights.quantized:
            lm_head = "fp32" if lm_head_kept else weights.name
        formats = Formats(weights=weights.name, embeddings="fp32", activations="fp32", kv_cache="fp32", other="fp32",
                          lm_head=lm_head, ops=ops)
        tied = spec.tied_embeddings and not weights.quantized  # a quantized export unties it
        return replace(spec, tied_embeddings=tied, formats=formats.validated())
    return spec.with_formats(weights=weights.name, ops=ops)
