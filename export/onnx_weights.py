"""Weights of a traced decoder graph stored in a registry format, rewritten in place on the ONNX model:

- a MatMul on a constant [K, N] weight becomes ONNX Runtime's MatMulNBits (int4/int8, symmetric, fp32
  scale per block, packed by ONNX Runtime's own quantizer), or for FP8 a FLOAT8E4M3FN initializer [K, N]
  with one fp32 scale per output row, DequantizeLinear(axis=1) into MatMul (opset 19 or later);
- the vocabulary: the lm_head is stored in that layout and the token embedding's Gather becomes
  GatherBlockQuantized (com.microsoft) reading the same kind of initializers, the lm_head's own when the
  model ties them, so a tied table is stored once. GatherBlockQuantized takes MatMulNBits' uint8 blocks
  as [N, blocks, bytes] (quantize_axis 2, zero point 2^(bits-1): MatMulNBits' symmetric codes) and the
  FP8 table as [K, N] gathered along axis 1 (block_size 0: one scale per token); ONNX Runtime 1.32's
  CPU kernels return the lm_head's values exactly (tests/test_onnx_weights.py).
A planned student's weights are on its grid already: each stored weight is read back and must equal the
student's, so nothing is rounded twice.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from shrink.errors import ShrinkError
from shrink.numformats.registry import NumberFormat, matmul_nbits_name

MS = "com.microsoft"  # the domain of MatMulNBits and GatherBlockQuantized


@dataclass
class _Weight:
    index: int  # the MatMul's position in graph.node
    values: np.ndarray  # float32 [K, N] as the MatMul reads it
    source: str  # the initializer it comes from (a tied table when read through a Transpose)


def _is_nbits(fmt: NumberFormat) -> bool:
    return (fmt.onnx_op or "").startswith("MatMulNBits")


def _bits(fmt: NumberFormat) -> int:
    return 4 if fmt.compute == "int4" else 8


def _constant_matmuls(model: Any) -> list[_Weight]:
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    found = []
    for index, node in enumerate(model.graph.node):
        if node.op_type != "MatMul":
            continue
        name, transposed = node.input[1], False
        source = producers.get(name)
        if name not in inits and source is not None and source.op_type == "Transpose" and source.input[0] in inits:
            name, transposed = source.input[0], True
        if name not in inits or len(inits[name].dims) != 2:
            continue  # an activation x activation MatMul (attention scores)
        values = numpy_helper.to_array(inits[name]).astype(np.float32)
        found.append(_Weight(index, np.ascontiguousarray(values.T if transposed else values), name))
    return found


def _pack(values: np.ndarray, fmt: NumberFormat, name: str) -> tuple[Any, Any, np.ndarray]:
    """The stored initializers (data, scales) of a [K, N] weight in `fmt`, and the values they hold."""
    import torch
    from onnx import TensorProto, helper, numpy_helper

    if _is_nbits(fmt):
        bits = _bits(fmt)
        packed, scales, _ = _ort_quantizer(fmt.block, bits).qbits_block_quant(values)
        held = _unpack_nbits(packed, scales, bits, fmt.block, values.shape[0])
        return numpy_helper.from_array(packed, f"{name}_Q{bits}"), numpy_helper.from_array(scales, f"{name}_scales"), held
    if fmt.grid == "fp8_e4m3_channel":
        from shrink.numformats.grids import dequantize, quantize

        q = quantize(torch.from_numpy(np.ascontiguousarray(values.T)), fmt.grid)  # [N, K]: a scale per output row
        codes = np.ascontiguousarray(q.codes.numpy().T)
        data = helper.make_tensor(f"{name}_fp8", TensorProto.FLOAT8E4M3FN, list(codes.shape), codes.tobytes(), raw=True)
        scales = numpy_helper.from_array(q.scales.numpy().reshape(-1), f"{name}_scale")
        return data, scales, np.ascontiguousarray(dequantize(q).numpy().T)
    raise ShrinkError(f"{fmt.name} has no ONNX weight layout in shrink's exporter.")


def _ort_quantizer(block: int, bits: int) -> Any:
    """ONNX Runtime's own MatMulNBits block quantizer (symmetric). Importing its module configures the root
    logger at INFO (logging.basicConfig), which would print every later library log line: undone here."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, DefaultWeightOnlyQuantizer

    root.setLevel(level)
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
    return DefaultWeightOnlyQuantizer(DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=4,
                                                                   bits=bits))


def scales_array(init: Any) -> np.ndarray:
    from onnx import numpy_helper

    return numpy_helper.to_array(init).astype(np.float32)


def _unpack_nbits(packed: np.ndarray, scales: np.ndarray, bits: int, block: int, k: int) -> np.ndarray:
    """The [K, N] float weight symmetric MatMulNBits blocks hold (codes minus 2^(bits-1), times the block scale)."""
    n = packed.shape[0]
    if bits == 4:
        codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(n, -1).astype(np.float32) - 8
    else:
        codes = packed.reshape(n, -1).astype(np.float32) - 128
    blocks = codes.reshape(n, -1, block) * scales.reshape(n, -1, 1)
    return np.ascontiguousarray(blocks.reshape(n, -1)[:, :k].T)


def stored_weight(model: Any, node: Any) -> np.ndarray:
    """The [K, N] float weight a MatMulNBits node, or a MatMul fed by a float8 DequantizeLinear, computes with."""
    from onnx import numpy_helper

    inits = {init.name: init for init in model.graph.initializer}
    if node.op_type == "MatMulNBits":
        attrs = {a.name: a.i for a in node.attribute}
        return _unpack_nbits(numpy_helper.to_array(inits[node.input[1]]), scales_array(inits[node.input[2]]),
                             attrs["bits"], attrs["block_size"], attrs["K"])
    dq = next(n for n in model.graph.node if node.input[1] in n.output)
    codes = numpy_helper.to_array(inits[dq.input[0]]).astype(np.float32)
    return codes * scales_array(inits[dq.input[1]]).reshape(1, -1)


def _matmul(node: Any, data: Any, scales: Any, fmt: NumberFormat, k: int, n: int) -> list[Any]:
    from onnx import helper

    if _is_nbits(fmt):
        return [helper.make_node("MatMulNBits", [node.input[0], data.name, scales.name], list(node.output), name=node.name,
                                 domain=MS, K=k, N=n, bits=_bits(fmt), block_size=fmt.block, accuracy_level=4)]
    weight = f"{data.name}_dequantized"
    return [helper.make_node("DequantizeLinear", [data.name, scales.name], [weight], name=f"{node.name}_dq", axis=1),
            helper.make_node("MatMul", [node.input[0], weight], list(node.output), name=node.name)]


def _gather(node: Any, data: Any, scales: Any, fmt: NumberFormat, k: int, n: int) -> tuple[list[Any], list[Any]]:
    """GatherBlockQuantized nodes (and their shape constants) that replace Gather(table, ids) with a table
    stored as the lm_head's [K = hidden, N = vocab] weight; ids are [batch, sequence]."""
    from onnx import helper, numpy_helper

    name, ids, out = node.name, node.input[1], node.output[0]
    if _is_nbits(fmt):  # data [N, blocks, bytes]: gather rows, dequantize blocks along the last axis
        blocks = int(data.dims[1])
        shapes = [numpy_helper.from_array(np.array([n, blocks, 1], np.int64), f"{name}_scale_shape"),
                  numpy_helper.from_array(np.array([0, 0, k], np.int64), f"{name}_out_shape")]
        nodes = [helper.make_node("Reshape", [scales.name, shapes[0].name], [f"{name}_scales"], name=f"{name}_scales"),
                 helper.make_node("GatherBlockQuantized", [data.name, ids, f"{name}_scales"], [f"{name}_blocks"], name=name,
                                  domain=MS, gather_axis=0, quantize_axis=2, block_size=fmt.block, bits=_bits(fmt)),
                 helper.make_node("Reshape", [f"{name}_blocks", shapes[1].name], [out], name=f"{name}_rows")]
        return nodes, shapes
    # FP8 data [K, N]: gather columns (one scale per column, block_size 0), then [K, b, s] -> [b, s, K]
    shapes = [numpy_helper.from_array(np.array([1, n], np.int64), f"{name}_scale_shape")]
    nodes = [helper.make_node("Reshape", [scales.name, shapes[0].name], [f"{name}_scales"], name=f"{name}_scales"),
             helper.make_node("GatherBlockQuantized", [data.name, ids, f"{name}_scales"], [f"{name}_columns"], name=name,
                              domain=MS, gather_axis=1, quantize_axis=0, block_size=0),
             helper.make_node("Transpose", [f"{name}_columns"], [out], name=f"{name}_rows", perm=[1, 2, 0])]
    return nodes, shapes


def _embedding(model: Any, vocab_size: int) -> tuple[int, Any] | None:
    """The token embedding's Gather (its index) and its table initializer."""
    inits = {init.name: init for init in model.graph.initializer}
    for index, node in enumerate(model.graph.node):
        table = inits.get(node.input[0]) if node.op_type == "Gather" and node.input else None
        if table is not None and len(table.dims) == 2 and table.dims[0] == vocab_size:
            return index, table
    return None


def store_weights(model: Any, weights: NumberFormat, vocabulary: NumberFormat, vocab_size: int,
                  planned: dict[bytes, str] | None = None) -> int:
    """Rewrite the graph's constant MatMuls into `weights` (only the planned ones, checked to come out
    unchanged, for a student) and its vocabulary into `vocabulary` (left as it is when f32). Returns how
    many block weights were stored."""
    from onnx import numpy_helper

    found = _constant_matmuls(model)
    lm_head = next((w for w in found if w.values.shape[1] == vocab_size), None)
    replaced: dict[int, list[Any]] = {}
    new_inits: list[Any] = []
    stored = 0
    for w in found:
        if w is lm_head or (planned is not None and w.values.tobytes() not in planned):
            continue  # the vocabulary follows; a planned student's kept layers stay f32
        data, scales, held = _pack(w.values, weights, f"w{w.index}")
        if planned is not None and held.tobytes() != w.values.tobytes():
            raise ShrinkError(f"{weights.name} of {planned[w.values.tobytes()]} differs from the student's grid; not written.")
        replaced[w.index] = _matmul(model.graph.node[w.index], data, scales, weights, *w.values.shape)
        new_inits += [data, scales]
        stored += 1
    if planned is not None and stored != len(planned):
        raise ShrinkError(f"Found {stored} of the plan's {len(planned)} weights in the ONNX graph; "
                          "the export cannot keep the student's grid.")
    embedding = _embedding(model, vocab_size)
    if vocabulary.quantized and lm_head is not None and embedding is not None:
        data, scales, _ = _pack(lm_head.values, vocabulary, "lm_head")
        replaced[lm_head.index] = _matmul(model.graph.node[lm_head.index], data, scales, vocabulary, *lm_head.values.shape)
        new_inits += [data, scales]
        index, table = embedding
        table_values = numpy_helper.to_array(table).astype(np.float32).T
        if lm_head.source != table.name and not np.array_equal(table_values, lm_head.values):  # untied: its own table
            data, scales, _ = _pack(np.ascontiguousarray(table_values), vocabulary, "embedding")
            new_inits += [data, scales]
        nodes, shapes = _gather(model.graph.node[index], data, scales, vocabulary, *lm_head.values.shape)
        replaced[index] = nodes
        new_inits += shapes
    nodes = [new for i, node in enumerate(model.graph.node) for new in replaced.get(i, [node])]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(new_inits)
    _prune(model)
    _require_opsets(model, weights if stored else vocabulary)
    return stored


def _require_opsets(model: Any, fmt: NumberFormat) -> None:
    from onnx import helper

    domains = {op.domain or "": op for op in model.opset_import}
    if any(node.domain == MS for node in model.graph.node) and MS not in domains:
        model.opset_import.append(helper.make_opsetid(MS, 1))
    if fmt.grid and fmt.grid.startswith("fp8") and domains[""].version < 19:
        raise ShrinkError(f"The traced graph has ONNX opset {domains[''].version}; float8 DequantizeLinear needs 19 or later.")


def _prune(model: Any) -> None:
    """Drop nodes nothing reads (the Transpose of a table now stored quantized) and unused initializers."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [i for i, node in enumerate(graph.node) if not any(o in used for o in node.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    used = {name for node in graph.node for name in node.input}
    for i in reversed([i for i, init in enumerate(graph.initializer) if init.name not in used]):
        del graph.initializer[i]


@dataclass(frozen=True)
class StoredVocabulary:
    blocks: dict[str, int]  # registry format -> how many block MatMuls store it
    embedding: str  # the token embedding's registry format
    lm_head: str  # the lm_head's
    tied: bool  # the lm_head and the embedding read the same stored table


def read_layout(model: Any, vocab_size: int) -> StoredVocabulary:
    """What a graph written by `store_weights` (or a plain f32 trace) stores, read from its nodes."""
    inits = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    blocks: dict[str, int] = {}
    lm_head, lm_sources = "fp32", set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            name, columns, sources = matmul_nbits_name(attrs["bits"], attrs["block_size"]), attrs["N"], {node.input[1]}
        elif node.op_type == "MatMul":
            source = producers.get(node.input[1])
            if node.input[1] in inits:
                name, columns, sources = "fp32", int(inits[node.input[1]].dims[-1]), {node.input[1]}
            elif source is not None and source.op_type == "Transpose" and source.input[0] in inits:
                name, columns, sources = "fp32", int(inits[source.input[0]].dims[0]), {source.input[0]}
            elif source is not None and source.op_type == "DequantizeLinear" and source.input[0] in inits:
                name, columns, sources = "onnx_fp8", int(inits[source.input[0]].dims[-1]), {source.input[0]}
            else:
                continue  # an activation x activation MatMul (attention scores)
        else:
            continue
        if columns == vocab_size:
            lm_head, lm_sources = name, sources
        else:
            blocks[name] = blocks.get(name, 0) + 1
    embedding, table = "fp32", None
    for node in model.graph.node:
        if node.op_type == "GatherBlockQuantized":
            attrs = {a.name: a.i for a in node.attribute}
            embedding, table = (matmul_nbits_name(attrs.get("bits", 4), attrs["block_size"])
                                if inits[node.input[0]].data_type == 2 else "onnx_fp8"), node.input[0]  # 2: UINT8
        elif node.op_type == "Gather" and node.input[0] in inits and inits[node.input[0]].dims[0] == vocab_size:
            table = node.input[0]
    return StoredVocabulary(blocks, embedding, lm_head, table in lm_sources)
