"""Nemotron-H to GGUF (llama.cpp's `nemotron_h`): Mamba2, attention and ReLU² MLP blocks run in llama.cpp
with the PyTorch model's logits, pruned shapes included; what llama.cpp cannot hold is refused."""

import json
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from shrink.cli.app import app
from shrink.compress.importance import score
from shrink.compress.prune import prune_ffn, prune_heads, prune_hidden, prune_ssm
from shrink.errors import ShrinkError
from shrink.export.gguf import export_gguf
from shrink.export.runtimes import LlamaCppRunner, TorchRunner
from shrink.export.verify import compare
from shrink.model import LoadedModel, save
from tiny_models import peaked

# a 24-token prompt and a repetitive one (the recurrent state and the attention both see a history)
IDS = [[5, 17, 42, 8, 99, 23, 61, 4, 77, 30, 12, 88, 50, 3, 71, 19, 64, 27, 93, 11, 45, 36, 82, 9],
       [7, 3, 99, 42] * 6]
CALIBRATION = torch.randint(0, 101, (6, 24), generator=torch.Generator().manual_seed(1))
TOLERANCE = 2e-3  # max |logit difference|, as for the other families (tests/test_export_gguf.py)


def nemotron(tiny_model, **overrides) -> LoadedModel:
    """The dense tiny Nemotron-H (SSM, MLP, attention, MLP, SSM) with logits spread to std ~2 and its
    Mamba layers made to use their recurrent state. As initialised, the conv (weights std 0.02, bias 0)
    leaves x, B and C near 1e-3, so the state term C·h is ~1e-5 of the output and dt, A, B and C could
    be written wrong unseen; the time steps softplus(dt_bias) are 0.001-0.1, at which the state barely
    moves; A_log is log(1..8) and D and every norm weight ones, where a wrong reshape goes unseen."""
    loaded = tiny_model("nemotron_h-dense", **overrides)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if name.endswith("dt_bias"):  # time steps 0.2-1
                parameter.copy_(torch.rand(parameter.shape, generator=generator) * 2 - 1.5)
            elif name.endswith(("conv1d.weight", "conv1d.bias")):
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))
            elif name.endswith(("A_log", "D", "norm.weight")):
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
    peaked(loaded.model)
    return loaded


def metadata(path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields
    return {name: field.contents() for name, field in fields.items() if name.startswith("nemotron_h.")}


def parity(loaded, path):
    return compare(TorchRunner(loaded.model), LlamaCppRunner(path, 64), IDS)


def test_f32_export_matches_pytorch_in_llama_cpp(tmp_path, tiny_model):
    loaded = nemotron(tiny_model)
    report = export_gguf(loaded, tmp_path / "n.gguf", quant="f32")
    assert report.arch == "nemotron_h" and not report.notes
    meta = metadata(tmp_path / "n.gguf")
    # which layer is what: Mamba (0, 0), MLP (0, width), attention (kv heads, 0)
    assert meta["nemotron_h.attention.head_count_kv"] == [0, 0, 2, 0, 0]
    assert meta["nemotron_h.feed_forward_length"] == [0, 48, 0, 48, 0]
    assert (meta["nemotron_h.ssm.inner_size"], meta["nemotron_h.ssm.time_step_rank"],
            meta["nemotron_h.ssm.group_count"], meta["nemotron_h.ssm.state_size"]) == (64, 8, 2, 16)
    reference = TorchRunner(loaded.model).logits(IDS[0])
    assert reference.std() > 1.0  # spread logits: agreement below is not agreement on noise
    metrics = parity(loaded, tmp_path / "n.gguf")
    print(f"Nemotron-H f32 in llama.cpp: max |logit difference| {metrics.max_abs_logit_diff:.2e} "
          f"over {metrics.positions} positions")
    assert metrics.positions == 48 and metrics.top1_agreement == 1.0
    assert metrics.max_abs_logit_diff < TOLERANCE
    # the Mamba layers matter at this tolerance: without the last one's output, PyTorch is far away
    with torch.no_grad():
        loaded.model.model.layers[4].mixer.out_proj.weight.zero_()
    assert compare(TorchRunner(loaded.model), LlamaCppRunner(tmp_path / "n.gguf", 64), IDS).max_abs_logit_diff > 50 * TOLERANCE


def test_quantized_export_keeps_the_ssm_tensors_f32(tmp_path, tiny_model):
    loaded = nemotron(tiny_model)
    report = export_gguf(loaded, tmp_path / "q8.gguf", quant="q8_0")
    types = report.tensor_types
    for name in ("ssm_conv1d.weight", "ssm_a", "ssm_d", "ssm_norm.weight", "ssm_conv1d.bias", "ssm_dt.bias"):
        assert types[f"blk.0.{name}"] == "F32" and types[f"blk.4.{name}"] == "F32"
    for name in ("blk.0.ssm_in.weight", "blk.4.ssm_out.weight", "blk.2.attn_q.weight", "blk.1.ffn_up.weight",
                 "token_embd.weight", "output.weight"):
        assert types[name] == "Q8_0"
    # MLP rows are 48 wide, not a multiple of Q8_0's 32: F16, and reported (the rule of every family)
    assert {s["tensor"] for s in report.substitutions} == {"blk.1.ffn_down.weight", "blk.3.ffn_down.weight"}
    metrics = parity(loaded, tmp_path / "q8.gguf")
    assert metrics.top1_agreement >= 0.95 and metrics.mean_kl < 0.01
    q4 = export_gguf(loaded, tmp_path / "q4.gguf", quant="q4_0")
    assert q4.tensor_types["blk.0.ssm_in.weight"] == "Q4_0" and q4.tensor_types["blk.0.ssm_a"] == "F32"
    assert (tmp_path / "q4.gguf").stat().st_size < (tmp_path / "q8.gguf").stat().st_size
    assert parity(loaded, tmp_path / "q4.gguf").top1_agreement >= 0.5  # it runs and tracks the model


def test_pruned_nemotron_h_exports_exactly(tmp_path, tiny_model):
    """A narrower residual stream (24 of 32), group-aware SSM pruning (2 of 4 heads per group, 5 of 8
    channels), per-layer MLP widths and fewer attention heads: llama.cpp holds all of it. Pruning
    rescales the block norms' epsilon (hidden) and the gated norms' (SSM) apart, and llama.cpp has one
    epsilon for both: the export rescales the residual stream."""
    loaded = nemotron(tiny_model)
    pruned = prune_hidden(loaded, score(loaded, CALIBRATION), 24)
    pruned = prune_ssm(pruned, score(pruned, CALIBRATION), heads_per_group=2, head_dim=5)
    pruned = prune_ffn(pruned, score(pruned, CALIBRATION), [24, 40])
    pruned = prune_heads(pruned, score(pruned, CALIBRATION), 1)
    gated_eps = pruned.model.model.layers[0].mixer.norm.variance_epsilon
    assert gated_eps > 2 * pruned.model.model.layers[0].norm.variance_epsilon
    # --pad-to-uniform has nothing to do here: llama.cpp takes the per-layer widths as they are
    report = export_gguf(pruned, tmp_path / "p.gguf", quant="f32", pad_to_uniform=True)
    assert len(report.notes) == 1 and "residual stream is scaled" in report.notes[0]
    assert "output.weight" in report.tensor_types  # written untied: the logits read the unscaled table
    meta = metadata(tmp_path / "p.gguf")
    assert meta["nemotron_h.feed_forward_length"] == [0, 24, 0, 40, 0] and meta["nemotron_h.embedding_length"] == 24
    assert meta["nemotron_h.attention.head_count"] == 2 and meta["nemotron_h.attention.head_count_kv"][2] == 2
    assert (meta["nemotron_h.ssm.inner_size"], meta["nemotron_h.ssm.time_step_rank"]) == (20, 4)
    assert meta["nemotron_h.attention.layer_norm_rms_epsilon"] == pytest.approx(gated_eps, rel=1e-6)
    metrics = parity(pruned, tmp_path / "p.gguf")
    print(f"pruned Nemotron-H f32 in llama.cpp: max |logit difference| {metrics.max_abs_logit_diff:.2e}")
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < TOLERANCE


def test_the_output_projection_tied_or_not(tmp_path, tiny_model):
    # transformers never ties Nemotron-H's lm_head, whatever tie_word_embeddings says: it is written
    untied = nemotron(tiny_model, tie_word_embeddings=True)
    assert untied.spec.tied_embeddings and untied.model.lm_head.weight is not untied.model.model.embeddings.weight
    assert "output.weight" in export_gguf(untied, tmp_path / "u.gguf", quant="f32").tensor_types
    assert parity(untied, tmp_path / "u.gguf").max_abs_logit_diff < TOLERANCE
    # truly tied (one Parameter): llama.cpp reads token_embd twice, unless the residual stream is rescaled
    tied = nemotron(tiny_model, tie_word_embeddings=True)
    tied.model.lm_head.weight = tied.model.model.embeddings.weight
    assert "output.weight" not in export_gguf(tied, tmp_path / "t.gguf", quant="f32").tensor_types
    assert parity(tied, tmp_path / "t.gguf").max_abs_logit_diff < TOLERANCE
    pruned = prune_ssm(tied, score(tied, CALIBRATION), heads_per_group=3, head_dim=6)
    assert pruned.model.lm_head.weight is pruned.model.model.embeddings.weight
    assert "output.weight" in export_gguf(pruned, tmp_path / "p.gguf", quant="f32").tensor_types
    assert parity(pruned, tmp_path / "p.gguf").max_abs_logit_diff < TOLERANCE


def test_per_layer_attention_heads_are_an_array(tmp_path, tiny_model):
    loaded = tiny_model("nemotron_h-dense", layers_block_type=["linear_attention", "full_attention", "mlp",
                                                               "full_attention"])
    pruned = prune_heads(loaded, score(loaded, CALIBRATION), [1, 2])  # layer 1 keeps 2 heads, layer 3 all 4
    export_gguf(pruned, tmp_path / "h.gguf", quant="f32")
    meta = metadata(tmp_path / "h.gguf")
    # layers that are not attention repeat the first attention layer's count (llama.cpp reads layer 0's)
    assert meta["nemotron_h.attention.head_count"] == [2, 2, 2, 4]
    assert meta["nemotron_h.attention.head_count_kv"] == [0, 2, 0, 2]
    metrics = parity(pruned, tmp_path / "h.gguf")
    assert metrics.top1_agreement == 1.0 and metrics.max_abs_logit_diff < TOLERANCE


def test_what_llama_cpp_cannot_hold_is_refused(tmp_path, tiny_model):
    with pytest.raises(ShrinkError, match="mixture-of-experts.*'nemotron_h_moe'"):
        export_gguf(tiny_model("nemotron_h"), tmp_path / "moe.gguf")
    loaded = tiny_model("nemotron_h-dense")
    layers = list(loaded.spec.layers)
    layers[4] = replace(layers[4], mixer=replace(layers[4].mixer, num_heads=4))
    uneven = LoadedModel(loaded.model, None, replace(loaded.spec, layers=tuple(layers)), "tiny-uneven")
    with pytest.raises(ShrinkError, match="one Mamba2 shape"):
        export_gguf(uneven, tmp_path / "uneven.gguf")
    loaded.model.config.mlp_hidden_act = "silu"
    with pytest.raises(ShrinkError, match="mlp_hidden_act='silu'"):
        export_gguf(loaded, tmp_path / "silu.gguf")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_cli_exports_verifies_and_onnx_refuses(tmp_path, tiny_model):
    runner = CliRunner()
    directory = save(nemotron(tiny_model).model, tmp_path / "tiny-nemotron")
    result = runner.invoke(app, ["export", str(directory), "-f", "gguf", "--quant", "f32", "-o",
                                 str(tmp_path / "n.gguf"), "--json"])
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "n.gguf.manifest.json").read_text())
    assert manifest["verify"]["passed"] and manifest["archspec"]["family"] == "nemotron_h"
    result = runner.invoke(app, ["verify", str(tmp_path / "n.gguf"), "--json"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    # 384 positions of seeded random ids: top-1 may split one near-tie, the logits agree
    assert verdict["passed"] is True and verdict["metrics"]["max_abs_logit_diff"] < TOLERANCE
    # ONNX has no Mamba2 state yet: one sentence, exit code 2, nothing written
    result = runner.invoke(app, ["export", str(directory), "-f", "onnx", "-o", str(tmp_path / "onnx")])
    assert result.exit_code == 2 and "Traceback" not in result.output
    message = " ".join(result.output.split())
    assert "SSM layers" in message and message.count(". ") == 0
    assert not (tmp_path / "onnx").exists()


def test_logits_differ_without_the_ssm_conversion(tmp_path, tiny_model, monkeypatch):
    """The conversions are load-bearing: writing A_log where llama.cpp expects A = -exp(A_log) is
    caught by the same parity check that passes above."""
    import shrink.export.gguf_nemotron_h as module

    loaded = nemotron(tiny_model)
    original = module.nemotron_h_state

    def unconverted_a(loaded, state, planned, notes):
        a_logs = {name: value.reshape(-1, 1) for name, value in state.items() if name.endswith("A_log")}
        state = original(loaded, state, planned, notes)
        state.update(a_logs)
        return state

    monkeypatch.setattr("shrink.export.gguf.nemotron_h_state", unconverted_a)
    export_gguf(loaded, tmp_path / "wrong.gguf", quant="f32")
    difference = parity(loaded, tmp_path / "wrong.gguf").max_abs_logit_diff
    assert not difference < 50 * TOLERANCE  # a growing state: far off, or not even finite
