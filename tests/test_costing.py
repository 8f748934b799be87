"""Costing held to storage: for every format each exporter writes, the bytes the roofline costs equal
the bytes the artifact stores, read back from the file (the GGUF's tensor table; the ONNX graph's
initializers), for the quantized block weights (within 0.5%) and for all weights (within 1%)."""

import numpy as np
import pytest

from shrink.export.backend import costed_spec
from shrink.hardware.ops import weight_bytes_by_group
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import estimate

# rows of 256 and 512 divide into every block size, so no tensor falls back (fallbacks: test_planner_rows)
SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "vocab_size": 384}
GGUF_QUANTS = ["fp32", "fp16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "tq1_0", "tq2_0", "mxfp4"]
GGUF_FAMILIES = ["int8", "int4", "nvfp4", "mxfp4", "ternary", "binary"]


def _model(tiny_model, tied):
    return tiny_model("llama", tie_word_embeddings=tied, **SHAPE)


def _student(loaded, family, runtime):
    from shrink.compress.quant.plan import make_plan
    from shrink.compress.quant.student import fake_quantize, materialize

    plan = make_plan(loaded.model, family, runtime)
    assert not plan.fallbacks
    materialize(fake_quantize(loaded.model, plan), plan)
    return loaded


def _gguf_bytes(path):
    from gguf import GGUFReader

    tensors = GGUFReader(str(path)).tensors
    blocks = sum(int(t.n_bytes) for t in tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
    return blocks, sum(int(t.n_bytes) for t in tensors)


def _onnx_bytes(directory):
    """(bytes of the block weights, bytes of every initializer, bytes of FP8 row scales) as the graph stores
    them: a block weight is what a MatMulNBits, or a MatMul through a DequantizeLinear or on a constant,
    reads, other than the [.., vocab] lm_head."""
    import onnx

    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    inits = {init.name: init for init in model.graph.initializer}
    size = {name: int(np.prod(i.dims)) * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize
            for name, i in inits.items()}
    producers = {out: node for node in model.graph.node for out in node.output}
    blocks, scales = 0, set()
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            if {a.name: a.i for a in node.attribute}["N"] != SHAPE["vocab_size"]:
                blocks += sum(size[n] for n in node.input[1:] if n in size)
        elif node.op_type == "MatMul" and node.input[1] in inits:
            blocks += size[node.input[1]] * (inits[node.input[1]].dims[-1] != SHAPE["vocab_size"])
        elif node.op_type == "MatMul" and getattr(producers.get(node.input[1]), "op_type", "") == "DequantizeLinear":
            data, scale = producers[node.input[1]].input[:2]
            scales.add(scale)  # one fp32 per output row, vocabulary included
            blocks += (size[data] + size[scale]) * (inits[data].dims[-1] != SHAPE["vocab_size"])
        elif node.op_type == "GatherBlockQuantized" and inits[node.input[0]].data_type == onnx.TensorProto.FLOAT8E4M3FN:
            scales.add(producers[node.input[2]].input[0])  # the table's row scales, through a Reshape
    return blocks, sum(size.values()), sum(size[name] for name in scales)


def _check(costed, stored_blocks, stored_total):
    groups = weight_bytes_by_group(costed)
    assert groups["blocks"] == pytest.approx(stored_blocks, rel=0.005)
    weights = estimate(costed, get_profile("h100-sxm")).memory.weights_bytes
    assert weights == pytest.approx(stored_total, rel=0.01)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("quant", GGUF_QUANTS)
def test_gguf_export_stores_what_is_costed(tiny_model, tmp_path, quant, tied):
    from shrink.export.gguf import export_gguf

    loaded = _model(tiny_model, tied)
    export_gguf(loaded, tmp_path / "m.gguf", quant)
    _check(costed_spec(loaded.spec, quant, "gguf"), *_gguf_bytes(tmp_path / "m.gguf"))


@pytest.mark.parametrize("family", GGUF_FAMILIES)
def test_gguf_student_stores_what_is_costed(tiny_model, tmp_path, family):
    from shrink.export.gguf import export_gguf

    loaded = _student(_model(tiny_model, False), family, "gguf")
    export_gguf(loaded, tmp_path / "m.gguf")
    _check(costed_spec(loaded.spec, family, "gguf"), *_gguf_bytes(tmp_path / "m.gguf"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
@pytest.mark.parametrize("quant, block", [("f32", 32), ("int8", 32), ("int4", 32), ("int4", 128), ("fp8", 32)])
def test_onnx_export_stores_what_is_costed(tiny_model, tmp_path, quant, block, tied):
    """Quantized exports store the vocabulary in the blocks' layout (GatherBlockQuantized), a tied table
    once. FP8's record counts its codes: its fp32 row scales are 4 bytes per output row, exactly."""
    from shrink.export.onnx import export_onnx, onnx_format

    loaded = _model(tiny_model, tied)
    export_onnx(loaded, tmp_path / "onnx", quant, block)
    stored = onnx_format(quant, block).name
    blocks, total, row_scales = _onnx_bytes(tmp_path / "onnx")
    costed = costed_spec(loaded.spec, stored, "onnx", lm_head_kept=False)
    # output rows per layer: q, k, v, o, gate, up, down
    layer = (SHAPE["num_attention_heads"] + 2 * SHAPE["num_key_value_heads"]) * SHAPE["head_dim"] + 2 * SHAPE["hidden_size"] \
        + 2 * SHAPE["intermediate_size"]
    rows = layer * len(loaded.spec.layers) + SHAPE["vocab_size"] * (1 if tied else 2)
    assert row_scales == (4 * rows if quant == "fp8" else 0)
    block_scales = 4 * (rows - SHAPE["vocab_size"] * (1 if tied else 2)) if quant == "fp8" else 0
    _check(costed, blocks - block_scales, total - row_scales)


@pytest.mark.parametrize("family", ["int8", "int4", "fp8"])
def test_onnx_student_stores_what_is_costed(tiny_model, tmp_path, family):
    from shrink.export.onnx import export_onnx

    loaded = _student(_model(tiny_model, True), family, "onnx")
    export_onnx(loaded, tmp_path / "onnx")
    blocks, total, row_scales = _onnx_bytes(tmp_path / "onnx")
    _check(costed_spec(loaded.spec, family, "onnx"), blocks - row_scales, total - row_scales)


def test_artifact_formats_read_back_equal_the_costing(tiny_model, tmp_path):
    """What bench and the budget check read from a file is what the planner costed before writing it."""
    from shrink.export.gguf import export_gguf
    from shrink.export.onnx import export_onnx, onnx_formats
    from shrink.ggufmeta import gguf_formats

    loaded = _student(_model(tiny_model, True), "int4", "gguf")
    export_gguf(loaded, tmp_path / "m.gguf")
    assert gguf_formats(tmp_path / "m.gguf").formats == costed_spec(loaded.spec, "int4", "gguf").formats
    loaded = _model(tiny_model, False)
    export_gguf(loaded, tmp_path / "f16.gguf", "fp16")
    assert gguf_formats(tmp_path / "f16.gguf").formats == costed_spec(loaded.spec, None, "gguf").formats
    for tied, quant, stored in ((True, "int4", "onnx_int4_g32"), (False, "fp8", "onnx_fp8")):
        loaded = _model(tiny_model, tied)
        export_onnx(loaded, tmp_path / quant, quant, 32)
        read = onnx_formats(tmp_path / quant)
        planned = costed_spec(loaded.spec, stored, "onnx", lm_head_kept=False)
        assert read.formats == planned.formats and read.tied == planned.tied_embeddings == tied
        assert planned.formats.embeddings == stored  # the table is stored compactly, not f32


def test_a_mixed_k_quant_file_is_costed_byte_for_byte():
    """The embedded Q4_K_M file mixes types inside one operator (ffn_down: Q4_K in some layers, Q6_K in
    others; attn_v on Q8_0 beside Q5_0 q/k): costed per operator as a mixture, its bytes are the file's."""
    from dataclasses import asdict

    from gguf import GGUFReader

    from shrink.ggufmeta import gguf_formats
    from shrink.model import embedded_gguf_path, load_spec

    path = embedded_gguf_path()
    stored = gguf_formats(path).formats
    assert any("+" in fmt for _, fmt in stored.ops)  # a mixture was needed
    spec = load_spec("gemma-3-270m").with_formats(**{k: v for k, v in asdict(stored).items() if k != "ssm_state"})
    tensors = GGUFReader(str(path)).tensors
    blocks = sum(int(t.n_bytes) for t in tensors if t.name.startswith("blk.") and len(t.shape) >= 2)
    assert weight_bytes_by_group(spec)["blocks"] == pytest.approx(blocks, rel=1e-6)
    assert sum(weight_bytes_by_group(spec).values()) == pytest.approx(sum(int(t.n_bytes) for t in tensors), rel=1e-6)
