"""ONNX export: prefill and cached decode in ONNX Runtime match PyTorch; one copy of tied weights."""

import numpy as np
import pytest
import torch

from shrink.errors import ShrinkError
from shrink.export.onnx import export_onnx
from shrink.export.onnx_runtime import OnnxRunner
from shrink.export.runtimes import TorchRunner
from shrink.export.verify import compare
from shrink.families import spec_from_model
from shrink.model import LoadedModel

IDS = [list(range(1, 30))]


def decode_matches_prefill(runner, ids):
    """Feeding tokens one at a time through the cache gives the logits of one full prefill."""
    full = runner.logits(ids)
    logits, cache = runner.step(ids[:5], runner.empty_cache())
    rows = [logits]
    for token in ids[5:]:
        logits, cache = runner.step([token], cache)
        rows.append(logits)
    return np.abs(np.concatenate(rows) - full).max()


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_f32_onnx_matches_pytorch_for_prefill_and_decode(tmp_path, tiny_model, family):
    loaded = tiny_model(family)
    export_onnx(loaded, tmp_path / "m")
    runner = OnnxRunner(tmp_path / "m")
    metrics = compare(TorchRunner(loaded.model), runner, IDS)
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 1e-3
    assert decode_matches_prefill(runner, IDS[0]) < 1e-3


def test_non_uniform_model_exports_to_onnx(tmp_path, tiny_model):
    loaded = tiny_model("gemma3")  # a non-uniform Gemma 3 cannot be a GGUF; ONNX is its way out
    mlp = loaded.model.model.layers[2].mlp
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(32, 16, bias=False), torch.nn.Linear(32, 16, bias=False)
    mlp.down_proj = torch.nn.Linear(16, 32, bias=False)
    loaded = LoadedModel(loaded.model, None, spec_from_model(loaded.model), "tiny-gemma-pruned")
    export_onnx(loaded, tmp_path / "m")
    metrics = compare(TorchRunner(loaded.model), OnnxRunner(tmp_path / "m"), IDS)
    assert metrics.top1_agreement == 1.0


def test_int4_quantizes_matmuls_including_a_tied_lm_head(tmp_path, tiny_model):
    loaded = tiny_model("qwen2")  # tied embeddings
    import onnx

    report = export_onnx(loaded, tmp_path / "m", quant="int4", block_size=16)
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph
    constants = {init.name for init in graph.initializer}
    ops = [node.op_type for node in graph.node]
    # 2 layers x 7 projections + lm_head; the exporter either folds the tied table's Transpose into a
    # constant or leaves it, which shrink unties: either way no MatMul on a constant float weight is left.
    assert ops.count("MatMulNBits") == 15
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in constants]
    assert report.tensor_type_counts.get("UINT8", 0) == 15
    size = sum(p.stat().st_size for p in (tmp_path / "m").iterdir())
    export_onnx(loaded, tmp_path / "f", quant="f32")
    assert size < sum(p.stat().st_size for p in (tmp_path / "f").iterdir())


def test_ssm_models_are_refused_clearly(tmp_path, tiny_model):
    with pytest.raises(ShrinkError, match="attention-only"):
        export_onnx(tiny_model("nemotron_h"), tmp_path / "m")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_embedded_gemma3_onnx_stores_tied_weights_once(embedded, tmp_path):
    from shrink.export.prompts import verification_sequences

    export_onnx(embedded, tmp_path / "gemma")
    data = (tmp_path / "gemma" / "model.onnx.data").stat().st_size
    params = 268_098_176  # Gemma 3 270M's published count, its 262,144 x 640 = 168M table counted once
    assert data < params * 4 * 1.02  # float32, the tied table stored once (a second copy would be +63%)
    runner = OnnxRunner(tmp_path / "gemma")
    sequences = verification_sequences(embedded.tokenizer, embedded.spec.vocab_size)[:3]
    metrics = compare(TorchRunner(embedded.model), runner, sequences)
    assert metrics.positions >= 128 and metrics.top1_agreement >= 0.99
    assert decode_matches_prefill(runner, sequences[0][:40]) < 1e-2
    from shrink.export.generate import generate

    result = generate(tmp_path / "gemma", "The capital of France is", max_tokens=10)
    assert result.runtime == "onnxruntime" and "France" in result.text


def test_a_nan_weight_is_refused_before_the_graph_is_traced(tmp_path, tiny_model):
    loaded = tiny_model("llama")
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.down_proj.weight[1, 1] = float("inf")
    with pytest.raises(ShrinkError, match="down_proj.weight holds 1 NaN or infinite"):
        export_onnx(loaded, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


@pytest.mark.parametrize("mask_heads", [1, 4])
def test_grouped_attention_computes_what_eager_attention_does(mask_heads):
    from types import SimpleNamespace

    from transformers.models.gemma3.modeling_gemma3 import eager_attention_forward

    from shrink.export.onnx_attention import grouped_attention

    torch.manual_seed(0)
    query, key, value = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    mask = torch.zeros(2, mask_heads, 5, 11)  # longer than the keys, as transformers' masks may be
    mask[..., 3:6] = torch.finfo(torch.float32).min
    module = SimpleNamespace(num_key_value_groups=2, head_dim=8, training=False)
    for softcap in (None, 3.0):
        expected, _ = eager_attention_forward(module, query, key, value, mask[..., :9], scaling=0.3, softcap=softcap)
        got, _ = grouped_attention(module, query, key, value, mask, scaling=0.3, softcap=softcap)
        assert got.shape == expected.shape == (2, 5, 4, 8)
        assert torch.allclose(got, expected, atol=1e-6)


def test_the_graph_reads_the_kv_cache_without_copying_it_per_query_head(tmp_path, tiny_model):
    import onnx

    export_onnx(tiny_model("llama"), tmp_path / "m")  # 4 query heads share 2 KV heads
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"), load_external_data=False).graph
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    present = [out.name for out in graph.output if out.name.startswith("present_")]
    assert present
    for name in present:  # from the grown cache to its product, only views: no Expand (repeat_kv) on the way
        frontier, ops = [name], []
        while frontier:
            for node in consumers.get(frontier.pop(), []):
                ops.append(node.op_type)
                if node.op_type in ("Reshape", "Unsqueeze", "Transpose", "Expand"):
                    frontier += list(node.output)
        assert "MatMul" in ops and "Expand" not in ops, (name, ops)
