"""ONNX export: one decoder graph with KV-cache inputs and outputs, run by ONNX Runtime for both
prefill (empty past) and decode (one token, the cache from the previous call).

Built with `torch.onnx.export(dynamo=True)` through a wrapper whose inputs are plain tensors:
input_ids, attention_mask, position_ids and past_key_<i> / past_value_<i> for every attention
layer; outputs logits and present_key_<i> / present_value_<i>. Sequence axes are `Dim.DYNAMIC`
(arithmetic between Dims, such as past + new, fails to export). Weights live once, in
model.onnx.data; tied embeddings stay one tensor.

Why not optimum: optimum-onnx, the ONNX exporter of optimum, requires transformers < 4.58 and does
not import with the transformers 5 that shrink ships, so shrink drives the PyTorch exporter itself.
Non-uniform models export the same way: the graph takes each layer's shapes from its tensors.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink.archspec import ArchSpec, AttentionSpec, Formats
from shrink.errors import ShrinkError
from shrink.export.numerics import check_weights
from shrink.numformats.plan import saved_plan
from shrink.numformats.registry import FORMATS, NumberFormat, matmul_nbits_name
from shrink.storage import atomic_directory

log = logging.getLogger("shrink")
LAYOUT_FILE = "shrink_onnx.json"  # what the runner needs to feed the graph: layers, KV shapes, vocab
ONNX_QUANTS = ("f32", "int8", "int4")  # --quant; with --block-size they name a registry format (onnx_int4_g32)


@dataclass
class OnnxExport:
    path: Path
    quant: str
    tensor_type_counts: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"path": str(self.path), "arch": "onnx-decoder", "quant": self.quant,
                "tensor_type_counts": self.tensor_type_counts, "substitutions": [], "notes": self.notes}


def _attention_layers(spec: ArchSpec) -> list[AttentionSpec]:
    if any(layer.mixer_kind != "attention" for layer in spec.layers):
        raise ShrinkError("ONNX export with a KV cache covers attention-only models so far; SSM layers need a state "
                          "input that is not written yet.")
    return [layer.mixer for layer in spec.layers]


def _decoder_with_cache(model: Any, layers: int) -> Any:
    """The model behind plain-tensor inputs and outputs (defined here so importing the module does not import torch)."""
    import torch
    from transformers import DynamicCache

    class DecoderWithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, position_ids, *past):
            cache = DynamicCache()
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             past_key_values=cache, use_cache=True)
            present = []
            for layer in out.past_key_values.layers:
                present += [layer.keys, layer.values]
            return (out.logits, *present)

    return DecoderWithCache().eval()


def export_onnx(loaded: Any, directory: str | Path, quant: str = "f32", block_size: int = 32) -> OnnxExport:
    import torch

    stored = onnx_format(quant, block_size)
    planned = _planned_weights(loaded, stored)
    if planned is not None:
        stored = planned[0]
    spec: ArchSpec = loaded.spec
    attention = _attention_layers(spec)
    check_weights({k: v.detach().float().cpu().numpy() for k, v in loaded.model.state_dict().items()})
    model = loaded.model.float().eval()
    wrapper = _decoder_with_cache(model, len(attention))
    batch, past_len, new_len = 1, 3, 4
    past = []
    for a in attention:
        shape = (batch, a.num_kv_heads, past_len, a.head_dim)
        past += [torch.zeros(shape), torch.zeros(shape)]
    ids = torch.randint(0, spec.vocab_size, (batch, new_len))
    mask = torch.ones(batch, past_len + new_len, dtype=torch.long)
    positions = torch.arange(past_len, past_len + new_len).unsqueeze(0)
    names = [f"past_{kind}_{i}" for i in range(len(attention)) for kind in ("key", "value")]
    outputs = ["logits"] + [n.replace("past_", "present_") for n in names]
    dyn = torch.export.Dim.DYNAMIC
    shapes = {"input_ids": {0: dyn, 1: dyn}, "attention_mask": {0: dyn, 1: dyn}, "position_ids": {0: dyn, 1: dyn},
              "past": tuple({0: dyn, 2: dyn} for _ in names)}
    directory = Path(directory)
    result = OnnxExport(directory, stored.name)
    with atomic_directory(directory) as tmp:
        try:
            program = torch.onnx.export(wrapper, (ids, mask, positions, *past), dynamo=True, input_names=["input_ids", "attention_mask", "position_ids", *names],
                                        output_names=outputs, dynamic_shapes=shapes, report=False, verbose=False)
        except Exception as err:  # the exporter raises many types; the user needs the sentence, not the trace
            raise ShrinkError(f"torch.onnx.export could not trace this model ({type(err).__name__}: {str(err).splitlines()[0]}).") from None
        program.save(str(tmp / "model.onnx"), external_data=True)
        if stored.quantized:
            _quantize_weights(tmp, stored, result, planned[1] if planned else None)
        layout = {"layers": [{"num_kv_heads": a.num_kv_heads, "head_dim": a.head_dim} for a in attention],
                  "vocab_size": spec.vocab_size, "inputs": ["input_ids", "attention_mask", "position_ids", *names],
                  "outputs": outputs}
        (tmp / LAYOUT_FILE).write_text(json.dumps(layout, indent=2))
        if loaded.tokenizer is not None:  # so that the directory is a usable model on its own
            loaded.tokenizer.save_pretrained(tmp)
        result.tensor_type_counts = _initializer_types(tmp / "model.onnx")
    return result


def _initializer_types(path: Path) -> dict[str, int]:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    counts: dict[str, int] = {}
    for init in model.graph.initializer:
        kind = onnx.TensorProto.DataType.Name(init.data_type)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def onnx_format(quant: str, block_size: int = 32) -> NumberFormat:
    """The registry format `--quant` and `--block-size` name: fp32, or MatMulNBits int8/int4 per block."""
    quant = quant.lower()
    if quant not in ONNX_QUANTS:
        raise ShrinkError(f"Unknown ONNX weight type '{quant}'; choose one of: {', '.join(ONNX_QUANTS)}.")
    if quant == "f32":
        return FORMATS["fp32"]
    name = matmul_nbits_name(int(quant[3:]), block_size)
    if name not in FORMATS:
        blocks = sorted({f.block for f in FORMATS.values() if f.runtime == "onnx"})
        raise ShrinkError(f"--block-size {block_size} is not one MatMulNBits takes here; choose one of: "
                          f"{', '.join(map(str, blocks))}.")
    return FORMATS[name]


def _planned_weights(loaded: Any, stored: NumberFormat) -> tuple[NumberFormat, dict[bytes, str]] | None:
    """For a student from `shrink quantize --runtime onnx`: its MatMulNBits format and its planned
    weights by content (ONNX renames initializers, the values are what identify them)."""
    import numpy as np

    plan = saved_plan(loaded.model)
    if plan is None:
        return None
    if plan.runtime != "onnx":
        raise ShrinkError(f"This model was quantized on the {plan.runtime} grid ({plan.grid}); export it with "
                          f"-f {plan.runtime if plan.runtime != 'torch' else 'gguf'} or quantize it again with --runtime onnx.")
    if stored.quantized:
        raise ShrinkError(f"This model carries its own quantization plan ({plan.grid}); --quant does not apply to it.")
    if plan.fallbacks or any(FORMATS[t.stored].runtime != "onnx" for t in plan.tensors):
        raise ShrinkError("MatMulNBits takes one block size per export; this plan mixes grids "
                          f"({', '.join(sorted({t.grid for t in plan.tensors}))}), which ONNX export does not write yet.")
    weights = {np.ascontiguousarray(loaded.model.get_submodule(t.module).weight.detach().float().numpy().T).tobytes(): t.module
               for t in plan.tensors}
    return FORMATS[plan.stored], weights


def _matmul_nbits_weight(model: Any, node: Any) -> Any:
    """The [K, N] float weight a symmetric MatMulNBits node computes with."""
    import numpy as np
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    attrs = {a.name: a.i for a in node.attribute}
    packed = numpy_helper.to_array(inits[node.input[1]])
    scales = numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
    n, k, bits = attrs["N"], attrs["K"], attrs["bits"]
    if bits == 4:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.float32) - 8
    else:
        codes = packed.reshape(n, -1).astype(np.float32) - 128
    blocks = codes[:, :k].reshape(n, -1, attrs["block_size"]) * scales.reshape(n, -1, 1)
    return np.ascontiguousarray(blocks.reshape(n, k).T)


def _quantize_weights(directory: Path, stored: NumberFormat, result: OnnxExport,
                      planned: dict[bytes, str] | None = None) -> None:
    """Weight-only quantization with ONNX Runtime's MatMulNBits (4 or 8 bits, one scale per block).
    A planned student's weights are already on this grid (symmetric, signed max / -8 or -128 per 32),
    which the quantizer reproduces exactly: only its planned MatMuls are quantized, and each result
    is checked against the student."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # The quantizer logs a line per graph node at INFO; shrink's report says what was quantized.
    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)
    source = directory / "model.onnx"
    model = onnx.load(str(source))
    untied = _untie_transposed_matmuls(model)
    if untied:
        result.notes.append(f"untied {untied} MatMul weight(s) read through a Transpose (tied lm_head) so they quantize too")
    bits = 4 if stored.compute == "int4" else 8
    config = DefaultWeightOnlyQuantConfig(block_size=stored.block, is_symmetric=True, accuracy_level=4, bits=bits)
    exclude = []
    if planned is not None:  # the kept layers (an lm_head) stay f32: they are not on any grid
        matmuls = [node for node in model.graph.node if node.op_type == "MatMul"]
        include = [node.name for node in matmuls if _initializer_bytes(model, node.input[1]) in planned]
        exclude = [node.name for node in matmuls if node.name not in include]
        if len(include) != len(planned):
            raise ShrinkError(f"Found {len(include)} of the plan's {len(planned)} weights in the ONNX graph; "
                              "the export cannot keep the student's grid.")
    quantizer = MatMulNBitsQuantizer(model, algo_config=config, nodes_to_exclude=exclude)
    quantizer.process()
    if planned is not None:
        quantized = quantizer.model.model
        for node in (n for n in quantized.graph.node if n.op_type == "MatMulNBits"):
            if _matmul_nbits_weight(quantized, node).tobytes() not in planned:
                raise ShrinkError(f"ONNX Runtime's {stored.name} of {node.name} differs from the student's grid; not written.")
    for path in directory.iterdir():
        if path.name.startswith("model.onnx"):
            path.unlink()
    onnx.save_model(quantizer.model.model, str(source), save_as_external_data=True, location="model.onnx.data")
    kept = " (the lm_head too: the plan keeps it)" if planned is not None else ""
    result.notes.append(f"MatMul weights as {stored.onnx_op}, symmetric; embeddings and norms stay f32{kept}")


def _initializer_bytes(model: Any, name: str) -> bytes | None:
    import numpy as np
    from onnx import numpy_helper

    init = next((i for i in model.graph.initializer if i.name == name), None)
    return None if init is None else np.ascontiguousarray(numpy_helper.to_array(init).astype(np.float32)).tobytes()


def _untie_transposed_matmuls(model: Any) -> int:
    """Replace MatMul(x, Transpose(W)) on an initializer W by MatMul(x, W^T stored): the quantizer only
    handles a constant right operand, and a tied lm_head reaches MatMul through a Transpose."""
    import numpy as np
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    count = 0
    for node in list(model.graph.node):
        if node.op_type != "MatMul":
            continue
        source = producers.get(node.input[1])
        if source is None or source.op_type != "Transpose" or source.input[0] not in inits:
            continue
        weight = numpy_helper.to_array(inits[source.input[0]])
        name = f"{source.input[0]}.transposed"
        model.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(weight.T), name))
        node.input[1] = name
        count += 1
    return count



@dataclass(frozen=True)
class OnnxFormats:
    formats: Any  # archspec.Formats of what the graph stores
    tied: bool  # the lm_head reads the embedding table itself (no untied copy stored)


def onnx_formats(directory: str | Path) -> OnnxFormats:
    """What an exported decoder stores, read from its graph: the block MatMuls' format, the gather
    table's, and the lm_head's (an untied copy when the weights were quantized), so that an estimate
    costs the bytes ONNX Runtime reads."""
    import onnx

    directory = Path(directory)
    layout = json.loads((directory / LAYOUT_FILE).read_text())
    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    inits = {init.name for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    blocks: dict[str, int] = {}
    lm_head, tied = "fp32", False
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            name, columns = matmul_nbits_name(attrs["bits"], attrs["block_size"]), attrs["N"]
        elif node.op_type == "MatMul" and (node.input[1] in inits or node.input[1] in producers):
            source = producers.get(node.input[1])
            through_transpose = source is not None and source.op_type == "Transpose" and source.input[0] in inits
            if node.input[1] not in inits and not through_transpose:
                continue  # an activation x activation MatMul (attention scores)
            name, columns = "fp32", _columns(model, node.input[1] if not through_transpose else source.input[0],
                                             through_transpose)
            tied = tied or (through_transpose and columns == layout["vocab_size"])
        else:
            continue
        if columns == layout["vocab_size"]:
            lm_head = name
        else:
            blocks[name] = blocks.get(name, 0) + 1
    weights = max(blocks, key=blocks.get) if blocks else "fp32"
    formats = Formats(weights=weights, embeddings="fp32", activations="fp32", kv_cache="fp32", other="fp32",
                      lm_head=None if tied else lm_head)
    return OnnxFormats(formats, tied)


def _columns(model: Any, name: str, transposed: bool) -> int:
    init = next(i for i in model.graph.initializer if i.name == name)
    return int(init.dims[0] if transposed else init.dims[-1])
