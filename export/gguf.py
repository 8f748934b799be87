"""GGUF export through the gguf package's writer and quantizers, for llama.cpp.

Which tensors take which type (a documented choice, shown per tensor in the report):
- 1-D tensors (norms, biases) stay float32: they are tiny and llama.cpp reads them as f32.
- The token embedding and an untied lm_head take `--quant` when it is 8 bits or wider, and Q8_0
  for narrower types: at 4 bits the vocabulary projection dominates the quality loss for a small
  fraction of the time (llama.cpp's own Q4 mixes keep them at 6-8 bits for the same reason).
- Every other 2-D weight takes `--quant`. A row whose length is not a multiple of the type's block
  cannot take it; such a tensor takes Q8_0 (or F16 if even that does not fit) and the report lists
  it. Nothing falls back silently.
A student from `shrink quantize` carries its plan: each planned weight is packed on the grid it was
trained on (no re-rounding; a weight found off its grid is an error), the vocabulary tensors on the
plan's vocabulary grid, and `--quant` does not apply.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from shrink.archspec import ArchSpec, AttentionSpec
from shrink.errors import ShrinkError
from shrink.export.gguf_deci import deci_heads, deci_layers
from shrink.export.gguf_layout import GGUFLayout, choose_layout, gguf_tensor_name
from shrink.export.gguf_granite_hybrid import granite_hybrid_state, write_granite_hybrid_metadata
from shrink.export.gguf_nemotron_h import KEEP_F32, nemotron_h_state, write_nemotron_h_metadata
from shrink.export.gguf_rope import check_rope, write_rope
from shrink.export.gguf_tokenizer import gguf_vocabulary
from shrink.export.numerics import check_weights
from shrink.ggufmeta import copy_tokenizer_fields
from shrink.numformats.plan import TensorGrid, saved_plan
from shrink.numformats.registry import (
    FAMILIES,
    FORMATS,
    NumberFormat,
    fitting_format,
    get_format,
    stored_format,
    vocabulary_format,
)
from shrink.progress import ProgressLines
from shrink.storage import atomic_path

log = logging.getLogger("shrink")

# the stored formats (registry names) the gguf package's own quantizers write
QUANT_TYPES = ("fp32", "fp16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "tq1_0", "tq2_0", "mxfp4")


@dataclass
class GGUFExport:
    path: Path
    arch: str
    quant: str
    tensor_types: dict[str, str]  # GGUF tensor name -> GGML type written
    substitutions: list[dict[str, str]] = field(default_factory=list)  # tensors that could not take --quant
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for kind in self.tensor_types.values():
            counts[kind] = counts.get(kind, 0) + 1
        return {"path": str(self.path), "arch": self.arch, "quant": self.quant, "tensor_type_counts": counts,
                "substitutions": self.substitutions, "notes": self.notes}


def _ggml(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def export_gguf(loaded: Any, path: str | Path, quant: str = "f16", pad_to_uniform: bool = False) -> GGUFExport:
    import gguf

    quant = quant_format(quant)
    spec: ArchSpec = loaded.spec
    layout = choose_layout(spec, pad_to_uniform)
    config = getattr(loaded.model.config, "text_config", None) or loaded.model.config
    check_rope(config, layout.arch)
    state = {k: v.detach().float().cpu().numpy() for k, v in loaded.model.state_dict().items()}
    if spec.tied_embeddings:
        state.pop("lm_head.weight", None)
    plan = _gguf_plan(loaded, quant)
    planned = _planned_formats(plan, state) if plan else {}
    result = GGUFExport(Path(path), layout.arch, plan.stored if plan else quant, {})
    if layout.arch == "nemotron_h":
        state = nemotron_h_state(loaded, state, planned, result.notes)
    if layout.arch in ("granitehybrid", "granite"):
        state = granite_hybrid_state(loaded, state, planned)
    if layout.arch == "deci":
        spec = deci_layers(spec, state, result.notes)
    if pad_to_uniform and not spec.is_uniform and not layout.per_layer_shapes:  # nemotron_h, granitehybrid: nothing to pad
        spec = _pad_ffn_to_uniform(spec, state, result)
    # every tensor's type is decided first, so that one stored as F16 (asked for, or the fallback of a type
    # whose blocks do not fit its rows) is checked against float16's range before anything is written
    kinds = {hf_name: _tensor_type(gguf_tensor_name(hf_name, layout), array, quant if not plan else "fp16", result)
             for hf_name, array in state.items() if hf_name not in planned}
    check_weights(state, half=tuple(k for k, kind in kinds.items() if kind == "F16"))

    with atomic_path(path) as tmp, ProgressLines("GGUF export", len(state), "tensor") as lines:
        writer = gguf.GGUFWriter(str(tmp), layout.arch)
        _write_metadata(writer, layout, spec, config, loaded)
        _write_tokenizer(writer, loaded, spec)
        for hf_name, array in state.items():
            name = gguf_tensor_name(hf_name, layout)
            array = _convert(hf_name, array, layout, spec)
            if hf_name in planned:
                data, ggml_type = _pack_on_grid(hf_name, array, planned[hf_name])
                writer.add_tensor(name, data, raw_dtype=ggml_type)
                result.tensor_types[name] = ggml_type.name
            else:
                kind = kinds[hf_name]
                data = array if kind == "F32" else gguf.quants.quantize(array.astype(np.float32), _ggml(kind))
                writer.add_tensor(name, data, raw_dtype=None if kind == "F32" else _ggml(kind))
                result.tensor_types[name] = kind
            lines.advance()
        writer.add_file_type(_file_type(plan.stored if plan else quant))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        writer.close()
    return result


def quant_format(quant: str) -> str:
    name = get_format(quant).name if quant.lower() not in FAMILIES else stored_format(quant.lower(), "gguf").name
    if name not in QUANT_TYPES:
        raise ShrinkError(f"GGUF type '{quant}' is not one the gguf package writes; choose one of: {', '.join(QUANT_TYPES)}.")
    return name


def _gguf_plan(loaded: Any, quant: str) -> Any:
    plan = saved_plan(loaded.model)
    if plan is None:
        return None
    if plan.runtime != "gguf":
        raise ShrinkError(f"This model was quantized on the {plan.runtime} grid ({plan.grid}); export it with "
                          f"-f {plan.runtime if plan.runtime != 'torch' else 'onnx'} or quantize it again with --runtime gguf.")
    if quant != "fp16":
        raise ShrinkError(f"This model carries its own quantization plan ({plan.grid}); --quant does not apply to it.")
    return plan


def _planned_formats(plan: Any, state: dict) -> dict[str, NumberFormat]:
    """HF tensor name -> stored format, for the planned Linear weights and the vocabulary tensors."""
    formats = {f"{t.module}.weight": FORMATS[t.stored] for t in plan.tensors}
    if plan.vocabulary:
        vocabulary = FORMATS[TensorGrid("", plan.vocabulary).stored]
        formats.update({name: vocabulary for name in state if name.endswith(("embed_tokens.weight", "model.embeddings.weight", "lm_head.weight"))})
    return formats


def _pack_on_grid(hf_name: str, array: np.ndarray, stored: NumberFormat) -> tuple[np.ndarray, Any]:
    import torch
    from shrink.numformats.ggufpack import pack
    from shrink.numformats.grids import dequantize, from_grid_values

    weight = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    packed = from_grid_values(weight, stored.grid)
    if not torch.equal(dequantize(packed), weight):
        worst = float((dequantize(packed) - weight).abs().max())
        raise ShrinkError(f"{hf_name} is not on its {stored.grid} grid (off by up to {worst:.3g}); was it changed after "
                          "`shrink quantize`? Quantize it again.")
    return pack(packed, stored.gguf_type)


def _file_type(stored: str) -> int:
    """The file type a GGUF declares: a label (llama.cpp reads each tensor's own type)."""
    from gguf import LlamaFileType

    # llama.cpp names MXFP4 files after their first use (MoE experts); the type is the same
    names = {"fp32": "ALL_F32", "mxfp4": "MOSTLY_MXFP4_MOE"}
    name = names.get(stored, "MOSTLY_" + (FORMATS[stored].gguf_type or "F16"))
    return int(LlamaFileType[name]) if name in LlamaFileType.__members__ else int(LlamaFileType.GUESSED)


def _tensor_type(name: str, array: np.ndarray, quant: str, result: GGUFExport) -> str:
    if array.ndim == 1 or name.endswith(KEEP_F32):
        return "F32"
    wanted = FORMATS[quant]
    if name in ("token_embd.weight", "output.weight"):
        wanted = vocabulary_format(wanted, "gguf")
    chosen = fitting_format(wanted, [array.shape[-1]])  # GGUF chains end at fp16, whose block is 1
    if chosen is not wanted:
        result.substitutions.append({"tensor": name, "wanted": wanted.gguf_type, "written": chosen.gguf_type,
                                     "reason": f"rows of {array.shape[-1]} are not a multiple of {wanted.block}"})
    return chosen.gguf_type


def _convert(hf_name: str, array: np.ndarray, layout: GGUFLayout, spec: ArchSpec) -> np.ndarray:
    if layout.norm_offset and "norm" in hf_name:
        array = array + layout.norm_offset
    if layout.permute_qk and (hf_name.endswith("q_proj.weight") or hf_name.endswith("k_proj.weight")):
        layer = spec.layers[int(hf_name.split(".")[2])].mixer
        assert isinstance(layer, AttentionSpec)
        heads = layer.num_heads if "q_proj" in hf_name else layer.num_kv_heads
        array = _rope_permute(array, heads)
    return np.ascontiguousarray(array)


def _rope_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """Reorder each head's rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs."""
    rows = weights.shape[0]
    return weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:]).swapaxes(1, 2).reshape(weights.shape)


def _write_metadata(writer: Any, layout: GGUFLayout, spec: ArchSpec, config: Any, loaded: Any) -> None:
    if layout.arch == "nemotron_h":
        return write_nemotron_h_metadata(writer, spec, config, loaded)
    if layout.arch in ("granitehybrid", "granite"):
        return write_granite_hybrid_metadata(writer, spec, config, loaded)
    attn = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, AttentionSpec)]
    head_dim = attn[0].head_dim if attn else _config_head_dim(config)
    writer.add_name(Path(str(loaded.source)).name or loaded.source)
    writer.add_context_length(int(getattr(config, "max_position_embeddings", 4096)))
    writer.add_embedding_length(spec.hidden_size)
    writer.add_block_count(spec.num_layers)
    writer.add_vocab_size(spec.vocab_size)
    if layout.per_layer_shapes:
        writer.add_feed_forward_length([layer.ffn.width if layer.ffn is not None else 0 for layer in spec.layers])
        heads = [deci_heads(layer.mixer, spec.hidden_size // head_dim) for layer in spec.layers]
        writer.add_head_count([h for h, _ in heads])
        writer.add_head_count_kv([kv for _, kv in heads])
    else:
        writer.add_feed_forward_length(spec.layers[0].ffn.width)
        writer.add_head_count(attn[0].num_heads)
        writer.add_head_count_kv(attn[0].num_kv_heads)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    write_rope(writer, layout.arch, config, head_dim)
    windows = {a.sliding_window for a in attn}
    if layout.arch == "gemma3":
        # llama.cpp scales Gemma 3 queries by 1/sqrt(head_dim); Hugging Face by 1/sqrt(query_pre_attn_scalar).
        if int(getattr(config, "query_pre_attn_scalar", head_dim)) != head_dim:
            raise ShrinkError("This Gemma 3 model scales attention by query_pre_attn_scalar, which differs from its "
                              "head_dim, and llama.cpp assumes they are equal; export it as ONNX instead.")
        writer.add_sliding_window(int(config.sliding_window))
    elif windows - {None}:
        raise ShrinkError(f"Sliding-window attention in a '{layout.arch}' GGUF is not supported by llama.cpp; export it as ONNX instead.")


def _config_head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)




def _write_tokenizer(writer: Any, loaded: Any, spec: ArchSpec) -> None:
    source = getattr(loaded, "gguf_tokenizer", None)
    if source is not None:  # born as a GGUF: its own tokenizer keys, verbatim
        copy_tokenizer_fields(Path(source), writer)
    elif loaded.tokenizer is not None:
        gguf_vocabulary(loaded.tokenizer, spec.vocab_size).write(writer)
    else:  # no tokenizer at all (tiny test models): llama.cpp runs token ids with an empty vocabulary
        writer.add_tokenizer_model("none")


def _pad_ffn_to_uniform(spec: ArchSpec, state: dict[str, np.ndarray], result: GGUFExport) -> ArchSpec:
    """Zero-pad every layer's FFN to the widest one: the extra neurons output exactly zero."""
    attention = {(a.num_heads, a.num_kv_heads, a.head_dim) for a in (layer.mixer for layer in spec.layers)}
    if len(attention) > 1:
        raise ShrinkError("--pad-to-uniform pads FFN widths only; this model also has per-layer head counts: export it as ONNX instead.")
    width = max(layer.ffn.width for layer in spec.layers)
    for i, layer in enumerate(spec.layers):
        missing = width - layer.ffn.width
        if not missing:
            continue
        for proj in ("gate_proj", "up_proj"):
            key = f"model.layers.{i}.mlp.{proj}.weight"
            state[key] = np.concatenate([state[key], np.zeros((missing, state[key].shape[1]), np.float32)])
        key = f"model.layers.{i}.mlp.down_proj.weight"
        state[key] = np.concatenate([state[key], np.zeros((state[key].shape[0], missing), np.float32)], axis=1)
    result.notes.append(f"FFN widths zero-padded to {width} in every layer: outputs unchanged, no speed or size gain over the unpruned width.")
    return replace(spec, layers=tuple(replace(layer, ffn=replace(layer.ffn, width=width)) for layer in spec.layers))
