"""GGUF export: every supported family runs in llama.cpp with the PyTorch model's logits."""

import numpy as np
import pytest
import torch

from shrink.errors import ShrinkError
from shrink.export.gguf import export_gguf
from shrink.export.runtimes import LlamaCppRunner, TorchRunner
from shrink.export.verify import compare
from shrink.families import spec_from_model
from shrink.model import LoadedModel

IDS = [list(range(1, 41)), [7, 3, 99, 42] * 10]


def run(loaded, path, **kwargs):
    report = export_gguf(loaded, path, **kwargs)
    return report, compare(TorchRunner(loaded.model), LlamaCppRunner(path, 64), IDS)


@pytest.mark.parametrize("family, arch", [("llama", "llama"), ("llama-bias", "llama"), ("qwen2", "qwen2"),
                                          ("qwen3", "qwen3"), ("gemma3", "gemma3")])
def test_f32_export_matches_pytorch_in_llama_cpp(tmp_path, tiny_model, family, arch):
    report, metrics = run(tiny_model(family), tmp_path / "m.gguf", quant="f32")
    assert report.arch == arch
    assert metrics.top1_agreement == 1.0
    assert metrics.max_abs_logit_diff < 2e-3


def test_quantized_export_writes_packed_types(tmp_path, tiny_model):
    report, metrics = run(tiny_model("llama"), tmp_path / "m.gguf", quant="q8_0")
    # ffn_down rows are 48 wide (the tiny FFN width), not a multiple of Q8_0's 32: F16, and reported
    assert {s["tensor"] for s in report.substitutions} == {"blk.0.ffn_down.weight", "blk.1.ffn_down.weight"}
    assert {k: v for k, v in report.tensor_types.items() if "ffn_down" not in k and v != "F32"}
    assert set(v for k, v in report.tensor_types.items() if "ffn_down" not in k) == {"Q8_0", "F32"}
    assert metrics.mean_kl < 0.01
    q4, _ = run(tiny_model("llama"), tmp_path / "q4.gguf", quant="q4_0")
    assert q4.tensor_types["blk.0.attn_q.weight"] == "Q4_0"
    assert q4.tensor_types["token_embd.weight"] == "Q8_0"  # documented: embeddings keep 8 bits below q8_0
    assert (tmp_path / "q4.gguf").stat().st_size < (tmp_path / "m.gguf").stat().st_size


def test_rows_a_type_cannot_take_are_reported_not_hidden(tmp_path, tiny_model):
    report, _ = run(tiny_model("llama"), tmp_path / "m.gguf", quant="tq2_0")  # 256-wide blocks, 32-wide rows
    written = {s["tensor"]: s["written"] for s in report.substitutions}
    # the registry's chain TQ2_0 -> Q4_0 -> Q8_0 -> F16: rows of 32 take Q4_0, rows of 48 only F16
    assert written["blk.0.attn_q.weight"] == "Q4_0" and written["blk.0.ffn_down.weight"] == "F16"
    assert all("multiple of 256" in s["reason"] for s in report.substitutions)
    assert not any(kind == "TQ2_0" for kind in report.tensor_types.values())


def _non_uniform_llama(tiny_model):
    loaded = tiny_model("llama", num_hidden_layers=3)
    for i, width in ((0, 32), (2, 64)):
        mlp = loaded.model.model.layers[i].mlp
        mlp.gate_proj = torch.nn.Linear(32, width, bias=False)
        mlp.up_proj = torch.nn.Linear(32, width, bias=False)
        mlp.down_proj = torch.nn.Linear(width, 32, bias=False)
    return LoadedModel(loaded.model, None, spec_from_model(loaded.model), "tiny-non-uniform")


def test_non_uniform_llama_exports_as_deci(tmp_path, tiny_model):
    loaded = _non_uniform_llama(tiny_model)
    report, metrics = run(loaded, tmp_path / "deci.gguf", quant="f32")
    assert report.arch == "deci"
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 2e-3


def test_non_uniform_gemma3_refuses_unless_padded(tmp_path, tiny_model):
    loaded = tiny_model("gemma3")
    mlp = loaded.model.model.layers[0].mlp
    mlp.gate_proj, mlp.up_proj = torch.nn.Linear(32, 24, bias=False), torch.nn.Linear(32, 24, bias=False)
    mlp.down_proj = torch.nn.Linear(24, 32, bias=False)
    loaded = LoadedModel(loaded.model, None, spec_from_model(loaded.model), "tiny-gemma-pruned")
    with pytest.raises(ShrinkError, match="--pad-to-uniform"):
        export_gguf(loaded, tmp_path / "g.gguf", quant="f32")
    assert not (tmp_path / "g.gguf").exists()
    report, metrics = run(loaded, tmp_path / "g.gguf", quant="f32", pad_to_uniform=True)
    assert report.notes and "no speed" in report.notes[0]
    assert metrics.top1_agreement == 1.0


@pytest.mark.slow
def test_embedded_gemma3_f16_in_llama_cpp(embedded, tmp_path):
    from shrink.export.prompts import verification_sequences

    report = export_gguf(embedded, tmp_path / "gemma.gguf", quant="f16")
    sequences = verification_sequences(embedded.tokenizer, embedded.spec.vocab_size)
    metrics = compare(TorchRunner(embedded.model), LlamaCppRunner(report.path, 160), sequences)
    assert metrics.positions >= 256
    assert metrics.top1_agreement >= 0.99
    runner = LlamaCppRunner(report.path, 64)
    ids = embedded.tokenizer("The capital of France is").input_ids
    generated = []
    for _ in range(8):  # greedy decoding in llama.cpp
        generated.append(int(np.argmax(runner.logits(ids + generated)[-1])))
    reference = embedded.model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):]
    assert generated == reference.tolist()
    assert "France" in embedded.tokenizer.decode(generated)


def test_per_layer_head_counts_export_as_deci(tmp_path, tiny_model):
    loaded = tiny_model("llama")
    attention = loaded.model.model.layers[1].self_attn
    # keep 2 of 4 query heads in layer 1, one per KV group (GQA structure kept)
    attention.q_proj = torch.nn.Linear(32, 2 * 8, bias=False)
    attention.o_proj = torch.nn.Linear(2 * 8, 32, bias=False)
    attention.num_key_value_groups = 1
    loaded = LoadedModel(loaded.model, None, spec_from_model(loaded.model), "tiny-fewer-heads")
    assert [layer.mixer.num_heads for layer in loaded.spec.layers] == [4, 2]
    report, metrics = run(loaded, tmp_path / "heads.gguf", quant="f32")
    assert report.arch == "deci"
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < 2e-3


@pytest.mark.parametrize("quant, kind", [("bf16", "BF16"), ("f16", "F16"), ("q5_0", "Q5_0"), ("q4_1", "Q4_1"), ("mxfp4", "MXFP4")])
def test_gguf_types_pack_and_run(tmp_path, tiny_model, quant, kind):
    report, metrics = run(tiny_model("llama"), tmp_path / "m.gguf", quant=quant)
    assert report.tensor_types["blk.0.attn_q.weight"] == kind
    assert metrics.positions == 80 and metrics.top1_agreement >= 0.5  # it runs and tracks the model


def test_damaged_weights_are_named_before_anything_is_written(tmp_path, tiny_model):
    loaded = tiny_model("llama")
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[0, 0] = 1e5  # beyond float16's 65504
    with pytest.raises(ShrinkError, match="up_proj.weight holds values up to 1e\\+05, beyond float16"):
        export_gguf(loaded, tmp_path / "m.gguf", "f16")
    assert not (tmp_path / "m.gguf").exists()
    export_gguf(loaded, tmp_path / "m.gguf", "f32")  # float32 holds it
    with torch.no_grad():
        loaded.model.model.layers[1].self_attn.q_proj.weight[2, 3] = float("nan")
    with pytest.raises(ShrinkError, match="q_proj.weight holds 1 NaN or infinite"):
        export_gguf(loaded, tmp_path / "n.gguf", "q8_0")
    assert not (tmp_path / "n.gguf").exists()


def test_a_tensor_falling_back_to_f16_is_range_checked_before_writing(tmp_path, tiny_model):
    """Q8_0 blocks are 32 wide: the tiny FFN's 48-wide down_proj rows fall back to F16, where 1e5 overflows."""
    loaded = tiny_model("llama")
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.down_proj.weight[0, 0] = 1e5
    with pytest.raises(ShrinkError, match="down_proj.weight holds values up to 1e\\+05, beyond float16"):
        export_gguf(loaded, tmp_path / "m.gguf", "q8_0")
    assert not (tmp_path / "m.gguf").exists()
