"""Quantization plans, PTQ calibration, the fake-quantized student and its exact GGUF export."""

import json

import numpy as np
import pytest
import torch

from shrink.numformats.grids import quantize_dequantize
from shrink.compress.quant.plan import make_plan
from shrink.compress.quant.ptq import awq, clip_to_mse
from shrink.compress.quant.student import fake_quantize, materialize, saved_plan
from shrink.errors import ShrinkError
from shrink.model import load, save

CALIBRATION = torch.randint(0, 101, (8, 32), generator=torch.Generator().manual_seed(3))


# rows of 256 and 512: every GGUF grid's blocks (32, 64, 128, 256) divide them
WIDE = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 1, "head_dim": 64}


def logits(model, ids=CALIBRATION[:2]):
    with torch.no_grad():
        return model(ids).logits


def test_plan_lists_every_fallback_with_its_reason_and_keeps_the_vocabulary(tiny_model):
    loaded = tiny_model("gemma3")  # rows of 32 and 48: TQ's 256-element blocks divide none of them
    plan = make_plan(loaded.model, "ternary", "gguf")
    assert plan.grid == "ternary_b256" and plan.vocabulary == "q8_0"
    assert {t.grid for t in plan.tensors} == {"q4_0", "f16"}  # 48-wide rows divide into no block: F16
    assert all("256-element blocks" in t.fallback_reason for t in plan.tensors)
    assert "lm_head" in plan.kept and not any("lm_head" in t.module for t in plan.tensors)
    assert len(make_plan(tiny_model("llama", **WIDE).model, "ternary", "gguf").fallbacks) == 0
    with pytest.raises(ShrinkError, match="no gguf export"):
        make_plan(loaded.model, "fp8", "gguf")
    with pytest.raises(ShrinkError, match="Unknown format"):
        make_plan(loaded.model, "int3", "gguf")


def test_mse_clipping_never_does_worse_than_absmax_scales(tiny_model):
    loaded = tiny_model("llama", **WIDE)
    plan = make_plan(loaded.model, "int4", "gguf")
    with torch.no_grad():  # a few outliers, which absmax scales serve badly
        loaded.model.model.layers[0].mlp.down_proj.weight[::7, ::5] *= 12
    original = {t.module: loaded.model.get_submodule(t.module).weight.detach().clone() for t in plan.tensors}
    before = {m: (quantize_dequantize(w, plan.grid_of(m)) - w).pow(2).sum() for m, w in original.items()}
    ratio = clip_to_mse(loaded.model, plan)
    assert 0.5 <= ratio < 1.0
    for module, weight in original.items():
        after = (quantize_dequantize(loaded.model.get_submodule(module).weight, plan.grid_of(module)) - weight).pow(2).sum()
        assert after <= before[module] + 1e-6
    down = "model.layers.0.mlp.down_proj"
    assert (quantize_dequantize(loaded.model.get_submodule(down).weight, "q4_0") - original[down]).pow(2).sum() < before[down]  # strictly better where outliers are


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_awq_scaling_keeps_the_full_precision_function_and_helps_the_grid(tiny_model, family):
    heads = {"num_attention_heads": 2, "num_key_value_heads": 2} if family == "llama" else {}
    loaded = tiny_model(family, **heads)
    with torch.no_grad():  # salient input channels, as trained LLMs have: large activations, small weights
        for block in loaded.model.model.layers:
            for norm, projections in ((block.input_layernorm, ("q_proj", "k_proj", "v_proj")),):
                boost = torch.ones(norm.weight.shape[0])
                boost[:4] = 30.0
                if family == "gemma3":
                    norm.weight.copy_((1 + norm.weight) * boost - 1)
                else:
                    norm.weight.mul_(boost)
                for name in projections:
                    getattr(block.self_attn, name).weight.div_(boost)
    reference = logits(loaded.model)
    plan = make_plan(loaded.model, "int4", "gguf")
    quantized = fake_quantize(__import__("copy").deepcopy(loaded.model), plan)
    kl_plain = _kl(reference, logits(quantized))
    exponents = awq(loaded.model, plan, CALIBRATION, family)
    assert all(0.0 <= e <= 1.0 for e in exponents) and max(exponents) > 0
    assert torch.allclose(logits(loaded.model), reference, atol=1e-4)  # folding changed nothing in full precision
    kl_awq = _kl(reference, logits(fake_quantize(loaded.model, plan)))
    assert kl_awq < kl_plain


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("transform", ["single-input-kv", "kv-share", "both"])
def test_awq_folds_exactly_into_kv_transformed_models(tiny_model, family, transform):
    """AWQ's folds keep the function of a model whose K/V come from elsewhere: SingleInputKV's later layers read
    layer k's kv_norm (one group scales all their K/V projections and divides kv_norm), a consumer of a shared
    cache has no K/V projections, and an owner whose values other layers read keeps its v rows unscaled."""
    from shrink.compress.kvshare import share_kv
    from shrink.compress.swiftkv import single_input_kv

    loaded = tiny_model(family, num_hidden_layers=4, **({"num_attention_heads": 2, "num_key_value_heads": 2}
                                                         if family == "llama" else {}))
    if transform in ("kv-share", "both"):
        loaded = share_kv(loaded, [[0, 1], [2, 3]] if family == "llama" else [[0, 1]])
    if transform in ("single-input-kv", "both"):
        loaded = single_input_kv(loaded, 2)
        with torch.no_grad():
            kv_norm = loaded.model.model.layers[2].input_layernorm.kv_norm
            kv_norm.weight.add_(0.3 * torch.randn(kv_norm.weight.shape, generator=torch.Generator().manual_seed(1)))
    reference = logits(loaded.model)
    plan = make_plan(loaded.model, "int4", "gguf")
    exponents = awq(loaded.model, plan, CALIBRATION, family)
    assert torch.allclose(logits(loaded.model), reference, atol=1e-4)
    if family == "llama":  # per layer: q(+k, v), gate/up, down, and v -> o where no other layer reads v
        expected = {"single-input-kv": 4 * 4 + 1, "kv-share": 4 * 3, "both": 4 * 3 + 1}[transform]
        assert len(exponents) == expected


def _kl(reference, other):
    p = torch.log_softmax(reference, -1)
    return float((p.exp() * (p - torch.log_softmax(other, -1))).sum(-1).mean())


def test_student_forward_uses_the_grid_and_materializes_to_plain_linears(tiny_model, tmp_path):
    loaded = tiny_model("llama", **WIDE)
    plan = make_plan(loaded.model, "int4", "gguf")
    fake_quantize(loaded.model, plan)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj).__name__ == "FakeQuantLinear"
    assert not loaded.model.get_input_embeddings().weight.requires_grad  # the vocabulary is frozen on Q8_0
    fake_logits = logits(loaded.model)
    materialize(loaded.model, plan)
    q_proj = loaded.model.model.layers[0].self_attn.q_proj
    assert type(q_proj) is torch.nn.Linear
    assert torch.equal(quantize_dequantize(q_proj.weight, "q4_0"), q_proj.weight)  # on its grid
    assert torch.equal(logits(loaded.model), fake_logits)
    save(loaded.model, tmp_path / "student")
    again = load(str(tmp_path / "student"))
    assert saved_plan(again.model).grid == "q4_0"
    assert torch.equal(logits(again.model), fake_logits)


GGUF_GRIDS = [("int8", "Q8_0"), ("int4", "Q4_0"), ("mxfp4", "MXFP4"), ("nvfp4", "NVFP4"), ("ternary", "TQ2_0"),
              ("binary", "Q1_0")]


@pytest.mark.parametrize("family, ggml_type", GGUF_GRIDS)
def test_gguf_export_of_a_student_is_its_own_grid_bit_for_bit(tiny_model, family, ggml_type, tmp_path):
    import gguf

    from shrink.export.gguf import export_gguf
    from shrink.export.runtimes import LlamaCppRunner, TorchRunner
    from shrink.export.verify import compare

    loaded = tiny_model("llama", **WIDE)
    plan = make_plan(loaded.model, family, "gguf")
    assert not plan.fallbacks
    fake_quantize(loaded.model, plan)
    with torch.no_grad():  # a few steps of training move the weights; the grid follows them
        for p in loaded.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    materialize(loaded.model, plan)
    path = tmp_path / f"{family}.gguf"
    report = export_gguf(loaded, path)
    assert report.tensor_types["blk.0.attn_q.weight"] == ggml_type
    assert report.tensor_types["token_embd.weight"] == "Q8_0"
    reader = gguf.GGUFReader(str(path))
    stored = {t.name: _dequantize(t) for t in reader.tensors}
    student = loaded.model.model.layers[0]
    for gguf_name, weight in (("blk.0.attn_v.weight", student.self_attn.v_proj.weight),
                              ("blk.0.ffn_down.weight", student.mlp.down_proj.weight),
                              ("blk.0.attn_output.weight", student.self_attn.o_proj.weight)):
        np.testing.assert_array_equal(stored[gguf_name].reshape(weight.shape), weight.detach().numpy())
    metrics = compare(TorchRunner(loaded.model), LlamaCppRunner(path, 64), [list(range(1, 33))])
    assert metrics.top1_agreement >= 0.9, metrics


def _dequantize(tensor):
    import gguf

    if tensor.tensor_type.name != "Q1_0":
        return gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    blocks = np.asarray(tensor.data).reshape(-1, 18)  # gguf 0.19 cannot read Q1_0: fp16 d, then sign bits
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    signs = np.unpackbits(blocks[:, 2:], axis=1, bitorder="little").astype(np.float32) * 2 - 1
    return d * signs


def test_a_student_off_its_grid_or_for_another_runtime_is_refused(tiny_model, tmp_path):
    from shrink.export.gguf import export_gguf

    loaded = tiny_model("llama", **WIDE)
    plan = make_plan(loaded.model, "int4", "gguf")
    materialize(fake_quantize(loaded.model, plan), plan)
    with torch.no_grad():
        loaded.model.model.layers[0].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(ShrinkError, match="not on its q4_0 grid"):
        export_gguf(loaded, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()
    torch_plan = make_plan(tiny_model("llama", **WIDE).model, "int4", "torch")
    other = tiny_model("llama", **WIDE)
    materialize(fake_quantize(other.model, torch_plan), torch_plan)
    with pytest.raises(ShrinkError, match="torch grid"):
        export_gguf(other, tmp_path / "y.gguf")


def test_quantize_command_ptq_then_qad_lowers_kl_and_exports(tiny_text_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from shrink.cli.app import app

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    runner = CliRunner()
    # ternary: a grid coarse enough to leave the tiny model a gap to recover (its int4 PTQ is within 0.01 nats)
    args = ["quantize", str(model_dir), "--format", "ternary", "--runtime", "torch", "--data", str(text),
            "--seq-len", "16", "--json"]
    result = runner.invoke(app, [*args, "--qad", "--tokens", "2048", "--lr", "1e-3", "-o", str(tmp_path / "qad")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["grid"] == "ternary" and report["kept"] == "qad"
    assert report["qad"]["after"]["kl"] < report["ptq"]["kl"]
    assert report["qad"]["tokens"] == 2048
    assert saved_plan(load(str(tmp_path / "qad")).model).runtime == "torch"
    bad = runner.invoke(app, [*args, "--qad", "--ptq-only", "-o", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "exclude" in bad.output
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("family, bits", [("int4", 4), ("int8", 8)])
def test_onnx_export_of_a_student_keeps_its_grid_in_matmulnbits(tiny_model, family, bits, tmp_path):
    import onnx

    from shrink.export.onnx import _matmul_nbits_weight, export_onnx
    from shrink.export.onnx_runtime import OnnxRunner
    from shrink.export.runtimes import TorchRunner
    from shrink.export.verify import compare

    loaded = tiny_model("llama", **WIDE)
    plan = make_plan(loaded.model, family, "onnx")
    materialize(fake_quantize(loaded.model, plan), plan)
    export_onnx(loaded, tmp_path / "m")
    graph = onnx.load(str(tmp_path / "m" / "model.onnx"))
    nodes = [n for n in graph.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == len(plan.tensors) == 7  # q, k, v, o, gate, up, down; the lm_head stays f32
    assert all({a.name: a.i for a in n.attribute}["bits"] == bits for n in nodes)
    students = {loaded.model.get_submodule(t.module).weight.detach().numpy().T.tobytes() for t in plan.tensors}
    assert all(np.ascontiguousarray(_matmul_nbits_weight(graph, n)).tobytes() in students for n in nodes)
    metrics = compare(TorchRunner(loaded.model), OnnxRunner(tmp_path / "m"), [list(range(1, 33))])
    assert metrics.top1_agreement >= 0.9, metrics


def test_a_teacher_held_by_bitsandbytes_runs_on_the_cpu(tiny_model, tiny_text_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from shrink.cli.app import app
    from shrink.model import load_bitsandbytes

    wide = tiny_model("llama", **WIDE)  # bitsandbytes' CPU nf4 path needs rows of at least its 64-element blocks
    save(wide.model, tmp_path / "wide")
    held = load_bitsandbytes(str(tmp_path / "wide"), "nf4")
    assert type(held.model.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    assert (logits(held.model) - logits(wide.model)).abs().max() < 0.5
    with pytest.raises(ShrinkError, match="choose one of"):
        load_bitsandbytes(str(tmp_path / "wide"), "4bit")
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    result = CliRunner().invoke(app, ["quantize", str(model_dir), "--format", "int8", "--runtime", "torch",
                                      "--teacher-load", "8bit", "--qad", "--tokens", "512", "--data", str(text),
                                      "--seq-len", "16", "-o", str(tmp_path / "q"), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["qad"]["tokens"] == 512


def test_qad_that_raises_the_kl_leaves_the_ptq_weights(tiny_text_model_dir, tmp_path, monkeypatch):
    import torch

    from shrink.compress.data import prepare
    from shrink.compress.distill.evaluate import evaluate
    from shrink.compress.distill.teacher import teacher_topk
    from shrink.compress.quant.run import QuantizeSettings, quantize_model

    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    teacher, student = load(str(model_dir)), load(str(model_dir))
    split = prepare(teacher, str(text), seq_len=16)
    # a learning rate far too large for an 8-bit grid: QAD can only make it worse (PTQ KL 4e-5 -> 0.07)
    settings = QuantizeSettings(format="int8", runtime="torch", calibration="max", qad=True, tokens=512, lr=1e-3)
    report = quantize_model(student, teacher, split, settings, tmp_path / "ckpt")
    assert report["qad"]["after"]["kl"] > report["ptq"]["kl"] and report["kept"] == "ptq"
    with torch.no_grad():
        kl = evaluate(student.model, split.evaluation, *teacher_topk(teacher.model, split.evaluation)).kl
    assert kl == pytest.approx(report["ptq"]["kl"], rel=1e-4)


def test_qad_learning_rate_defaults_by_grid_and_reaches_the_trainer(tiny_text_model_dir, tmp_path, monkeypatch):
    from shrink.compress.data import prepare
    from shrink.compress.quant.run import QuantizeSettings, plain_train, qad_lr, quantize_model

    # one default per element width, whatever the grid's name, scale type or block size
    assert qad_lr("q8_0") == qad_lr("int8") == qad_lr("fp8_e4m3")
    assert qad_lr("q4_0") == qad_lr("nvfp4_gguf") == qad_lr("mxfp4") == qad_lr("int4_g128")
    assert qad_lr("binary_b128") == qad_lr("binary")
    # a finer grid moves less per step, so it never gets a larger rate than a coarser one, and the 8-bit
    # rate is strictly the smaller (benchmarks/qad_lr.py measures the 8- and 4-bit ones)
    assert qad_lr("int8") < qad_lr("q4_0") <= qad_lr("ternary_b256") <= qad_lr("binary")
    monkeypatch.setenv("SHRINK_CACHE", str(tmp_path / "cache"))
    model_dir, text = tiny_text_model_dir
    teacher = load(str(model_dir))
    split = prepare(teacher, str(text), seq_len=16)
    trained_at = []

    def train(model, split, train_topk, eval_topk, config, checkpoints, label):
        trained_at.append(config.lr)  # what the trainer is handed, not what the report says
        return plain_train(model, split, train_topk, eval_topk, config, checkpoints, label)

    for lr, expected in ((None, qad_lr("int8")), (3e-4, 3e-4)):  # the grid's default, then a given rate
        settings = QuantizeSettings(format="int8", runtime="torch", calibration="max", qad=True, tokens=256, lr=lr)
        report = quantize_model(load(str(model_dir)), teacher, split, settings, tmp_path / f"ckpt-{lr}", train=train)
        assert trained_at[-1] == report["qad"]["lr"] == expected
    assert len(trained_at) == 2
