"""What an export will store, as the roofline costs it: the parts every backend's `costed_spec` shares
(which operators fall back from a format whose blocks their rows do not divide, and into what). Each
backend (export/gguf_backend.py, export/onnx_backend.py) states its own storage rules beside them;
`export.backend.costed_spec` picks the backend, so that what is costed is what is written."""

from __future__ import annotations

from shrink.archspec import ArchSpec, AttentionSpec, LinearSpec, SSMSpec
from shrink.errors import ShrinkError
from shrink.hardware.ops import LINEAR_FFN_OP, LINEAR_MIXER_OP
from shrink.numformats.registry import FORMATS, NumberFormat, fitting_format, resolve_weights, stored_format, vocabulary_format


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
        elif isinstance(m, LinearSpec):
            rows.setdefault(LINEAR_MIXER_OP, set()).add(spec.hidden_size)
        if isinstance(f, LinearSpec):
            rows.setdefault(LINEAR_FFN_OP, set()).add(spec.hidden_size)
        elif f is not None and not f.is_moe:
            rows.setdefault("ffn.up", set()).add(spec.hidden_size)
            rows.setdefault("ffn.down", set()).add(f.width)
    return rows


def fallbacks(spec: ArchSpec, weights: NumberFormat) -> dict[str, NumberFormat]:
    """Operators whose weights cannot take `weights` and the format they take instead."""
    found = {}
    for op, rows in op_row_lengths(spec).items():
        chosen = fitting_format(weights, rows)
        if chosen is None:
            raise ShrinkError(f"Rows of {sorted(rows)} divide into no format after {weights.name}.")
        if chosen is not weights:
            found[op] = chosen
    return found


def planned_weights(family: str | None, runtime: str) -> NumberFormat:
    """The stored format of the block weights: a family's for `runtime`, or a stored format named as it is."""
    return stored_format(None, runtime) if family is None else resolve_weights(family, runtime)


def fallback_ops(spec: ArchSpec, weights: NumberFormat) -> tuple[tuple[str, str], ...]:
    """Formats.ops for the operators that fall back from `weights`."""
    return tuple((op, f.name) for op, f in fallbacks(spec, weights).items())


def onnx_vocabulary(weights: NumberFormat, hidden: int, kept: bool) -> NumberFormat:
    """What an ONNX export stores the token embedding and the lm_head in (export/onnx_weights.py writes it):
    f32 where a student's plan keeps them (`kept`) or the weights are f32; else the registry's vocabulary
    format for the weights, when its blocks divide the hidden size (GatherBlockQuantized returns whole
    blocks), else f32."""
    if kept:
        return FORMATS["fp32"]
    return fitting_format(vocabulary_format(weights, "onnx"), [hidden]) or FORMATS["fp32"]
