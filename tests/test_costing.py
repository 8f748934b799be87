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
    import onnx

    model = onnx.load(str(directory / "model.onnx"), load_external_data=False)
    size = {}
    for init in model.graph.initializer:
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(init.data_type)).itemsize
        size[init.name] = int(np.prod(init.dims)) * itemsize
    vocab = [i for i in model.graph.initializer if SHAPE["vocab_size"] in i.dims]
    quantized = {name for node in model.graph.node if node.op_type in ("MatMulNBits", "MatMul")
                 for name in node.input[1:] if name in size}
    blocks = sum(size[n] for n in quantized if n not in {v.name for v in vocab}
                 and not any(n.startswith(v.name) for v in vocab))
    # MatMulNBits' scales of the lm_head are not [vocab]-shaped: count them by their node
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and {a.name: a.i for a in node.attribute}["N"] == SHAPE["vocab_size"]:
            blocks -= sum(size[n] for n in node.input[1:] if n in size and n not in {v.name for v in vocab})
    return blocks, sum(size.values())


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


@pytest.mark.parametrize("quant, block", [("f32", 32), ("int8", 32), ("int4", 32), ("int4", 128)])
def test_onnx_export_stores_what_is_costed(tiny_model, tmp_path, quant, block):
    from shrink.export.onnx import export_onnx, onnx_format

    loaded = _model(tiny_model, True)
    export_onnx(loaded, tmp_path / "onnx", quant, block)
    stored = onnx_format(quant, block).name
    _check(costed_spec(loaded.spec, stored, "onnx", lm_head_kept=False), *_onnx_bytes(tmp_path / "onnx"))


@pytest.mark.parametrize("family", ["int8", "int4"])
def test_onnx_student_stores_what_is_costed(tiny_model, tmp_path, family):
    from shrink.export.onnx import export_onnx

    loaded = _student(_model(tiny_model, True), family, "onnx")
    export_onnx(loaded, tmp_path / "onnx")
    _check(costed_spec(loaded.spec, family, "onnx"), *_onnx_bytes(tmp_path / "onnx"))


def test_artifact_formats_read_back_equal_the_costing(tiny_model, tmp_path):
    """What bench and the budget check read from a file is what the planner costed before writing it."""
    from dataclasses import replace

    from shrink.export.gguf import export_gguf
    from shrink.export.onnx import export_onnx, onnx_formats
    from shrink.ggufmeta import gguf_formats

    loaded = _student(_model(tiny_model, True), "int4", "gguf")
    export_gguf(loaded, tmp_path / "m.gguf")
    assert gguf_formats(tmp_path / "m.gguf").formats == costed_spec(loaded.spec, "int4", "gguf").formats
    loaded = _model(tiny_model, False)
    export_gguf(loaded, tmp_path / "f16.gguf", "fp16")
    assert gguf_formats(tmp_path / "f16.gguf").formats == costed_spec(loaded.spec, None, "gguf").formats
    loaded = _model(tiny_model, True)
    export_onnx(loaded, tmp_path / "onnx", "int4", 32)
    read = onnx_formats(tmp_path / "onnx")
    planned = costed_spec(loaded.spec, "onnx_int4_g32", "onnx", lm_head_kept=False)
    assert read.formats == planned.formats and read.tied == planned.tied_embeddings
    assert replace(planned.formats, lm_head=None) != planned.formats  # the untied copy is costed apart


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
