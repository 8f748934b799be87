"""ONNX weight layouts in ONNX Runtime: FP8 (float8 initializers through DequantizeLinear) matches the
fake-quantized PyTorch model, a QAD fp8 student is stored exactly on its grid, the compact vocabulary
(GatherBlockQuantized) returns the lm_head's own values, and FP4 is refused in one sentence."""

import numpy as np
import onnx
import pytest
import torch
from typer.testing import CliRunner

from shrink.export.onnx import export_onnx
from shrink.export.onnx_runtime import OnnxRunner
from shrink.export.onnx_weights import _pack, stored_weight
from shrink.export.runtimes import TorchRunner
from shrink.export.verify import compare
from shrink.numformats.grids import quantize_dequantize
from shrink.numformats.registry import FORMATS

SHAPE = {"hidden_size": 256, "intermediate_size": 512, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "vocab_size": 384}
IDS = [list(range(1, 40))]


def _graph(directory):
    return onnx.load(str(directory / "model.onnx"))


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_fp8_export_runs_in_onnx_runtime_and_matches_the_fake_quantized_model(tiny_model, tmp_path, tied):
    loaded = tiny_model("llama", tie_word_embeddings=tied, **SHAPE)
    report = export_onnx(loaded, tmp_path / "m", "fp8")
    assert report.quant == "onnx_fp8" and report.tensor_type_counts["FLOAT8E4M3FN"] == (15 if tied else 16)
    graph = _graph(tmp_path / "m").graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("DequantizeLinear") == 15 and ops.count("GatherBlockQuantized") == 1 and "Gather" not in ops
    # the reference: every Linear weight and the token table on the fp8 grid (E4M3, fp32 scale per row)
    with torch.no_grad():
        for module in loaded.model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                module.weight.copy_(quantize_dequantize(module.weight, "fp8_e4m3_channel"))
    metrics = compare(TorchRunner(loaded.model), OnnxRunner(tmp_path / "m"), IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 1e-3, metrics


@pytest.mark.parametrize("runtime", ["onnx", "torch"])
def test_an_fp8_student_is_stored_exactly_on_its_grid(tiny_model, tmp_path, runtime):
    from shrink.compress.quant.plan import make_plan
    from shrink.compress.quant.student import fake_quantize, materialize

    loaded = tiny_model("llama", **SHAPE)
    plan = make_plan(loaded.model, "fp8", runtime)
    assert plan.grid == "fp8_e4m3_channel"
    materialize(fake_quantize(loaded.model, plan), plan)
    report = export_onnx(loaded, tmp_path / "m")
    assert report.quant == "onnx_fp8"
    graph = _graph(tmp_path / "m")
    matmuls = [n for n in graph.graph.node if n.op_type == "MatMul" and any(n.input[1] in d.output for d in graph.graph.node
                                                                             if d.op_type == "DequantizeLinear")]
    assert len(matmuls) == len(plan.tensors) and "lm_head" in plan.kept  # the vocabulary stays f32, as the plan keeps it
    students = {np.ascontiguousarray(loaded.model.get_submodule(t.module).weight.detach().numpy().T).tobytes()
                for t in plan.tensors}
    assert all(np.ascontiguousarray(stored_weight(graph, n)).tobytes() in students for n in matmuls)
    metrics = compare(TorchRunner(loaded.model), OnnxRunner(tmp_path / "m"), IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 1e-3, metrics


def _embedding_rows(directory, ids):
    """What the exported graph's token embedding returns for `ids`, read from ONNX Runtime itself."""
    import onnxruntime as ort

    model = _graph(directory)
    gather = next(n for n in model.graph.node if n.op_type == "GatherBlockQuantized")
    last = next(n for n in model.graph.node if gather.output[0] in n.input)  # the Reshape / Transpose back to rows
    model.graph.output.append(onnx.helper.make_tensor_value_info(last.output[0], onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    runner = OnnxRunner(directory)
    feed = {**runner.empty_cache(), "input_ids": np.array([ids], np.int64), "attention_mask": np.ones((1, len(ids)), np.int64),
            "position_ids": np.arange(len(ids))[None, :]}
    return session.run([last.output[0]], feed)[0][0], model


def _lm_head(model):
    inits = {i.name: i for i in model.graph.initializer}
    producers = {out: n for n in model.graph.node for out in n.output}
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and {a.name: a.i for a in node.attribute}["N"] == SHAPE["vocab_size"]:
            return node
        dq = producers.get(node.input[1]) if node.op_type == "MatMul" else None
        if dq is not None and dq.op_type == "DequantizeLinear" and inits[dq.input[0]].dims[-1] == SHAPE["vocab_size"]:
            return node
    raise AssertionError("no quantized lm_head")


@pytest.mark.parametrize("quant", ["int4", "int8", "fp8"])
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_the_compact_embedding_returns_the_stored_table_exactly(tiny_model, tmp_path, quant, tied):
    loaded = tiny_model("llama", tie_word_embeddings=tied, **SHAPE)
    report = export_onnx(loaded, tmp_path / "m", quant)
    ids = [0, 5, 383, 7, 7, 100]
    rows, model = _embedding_rows(tmp_path / "m", ids)
    table = loaded.model.get_input_embeddings().weight.detach().float().numpy()
    _, _, expected = _pack(np.ascontiguousarray(table.T), FORMATS[report.quant], "check")  # [hidden, vocab] as stored
    assert np.array_equal(rows, expected.T[ids])
    lm_head = _lm_head(model)
    if tied:  # one table: the lm_head computes with exactly the rows the embedding returns
        assert np.array_equal(stored_weight(model, lm_head).T[ids], rows)
    stored = {i.name for i in model.graph.initializer if SHAPE["vocab_size"] in i.dims}
    assert len(stored) == (2 if tied else 4)  # data and scales per table


def test_fp4_has_no_onnx_artifact_because_onnx_runtime_cannot_compute_with_it(tiny_llama_dir, tmp_path):
    """The refusal's reason holds for the installed ONNX Runtime: no CPU kernel computes with FLOAT4E2M1
    (only GatherBlockQuantized reads it); when one appears, this test says so."""
    import onnxruntime.capi.onnxruntime_pybind11_state as ort_state

    from shrink.cli.app import app

    fp4 = {k.op_name for k in ort_state.get_all_opkernel_def() if k.provider == "CPUExecutionProvider"
           and any("float4e2m1" in t for types in k.type_constraints.values() for t in types)}
    assert fp4 == {"GatherBlockQuantized"}
    for family in ("nvfp4", "mxfp4"):
        result = CliRunner().invoke(app, ["export", str(tiny_llama_dir), "-f", "onnx", "--quant", family,
                                          "-o", str(tmp_path / family)])
        assert result.exit_code == 2, result.output
        text = " ".join(result.output.split())
        assert f"{family} has no ONNX artifact" in text and "FLOAT4E2M1" in text and text.count(". ") == 0
        assert "Traceback" not in result.output and not (tmp_path / family).exists()
