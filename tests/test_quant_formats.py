"""Weight grids against independent references: gguf's quantizers and dequantizers, llama.cpp's own Q1_0
quantizer, torch's float8 dtypes, the E2M1/E4M3 value tables; property tests for the error bounds."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from shrink.compress.quant.fakequant import FakeQuantLinear, fake_quant
from shrink.compress.quant.formats import (
    E2M1, GRIDS, KVALUES_DOUBLED, dequantize, effective_bits, from_grid_values, quantize, quantize_dequantize,
)
from shrink.compress.quant.ggufpack import pack
from shrink.errors import ShrinkError


def weights(rows=6, cols=512, seed=0):
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=generator) * 0.05
    w[0, :7] = 0
    w[1] = 0  # an all-zero row: zero scales, no NaN
    w[-1, 3] = 0.9  # an outlier
    return w


def test_e2m1_table_is_the_doubled_kvalues_of_gguf():
    assert sorted({abs(v) / 2 for v in KVALUES_DOUBLED}) == list(E2M1)
    assert len(KVALUES_DOUBLED) == 16


def test_nvfp4_values_lie_on_e2m1_times_e4m3_block_scales_times_the_tensor_scale():
    w = weights()
    q = quantize(w, "nvfp4")
    block_scales = q.scales * 2 / q.tensor_scale  # stored halved for the doubled table
    e4m3 = block_scales.to(torch.float8_e4m3fn).float()
    assert torch.allclose(e4m3, block_scales, rtol=1e-6, atol=0)
    every_e4m3 = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    assert set(torch.unique(e4m3).tolist()) <= set(every_e4m3[torch.isfinite(every_e4m3)].tolist())
    assert q.tensor_scale == pytest.approx(float(w.abs().max()) / (6 * 448), rel=1e-6)
    # hand example: one block [6, 3, -1.5, 0.4, 0...] with tensor amax 6 -> tensor scale 6/2688,
    # block scale e4m3(6/6/ts) = 448, values 6, 3, -1.5, 0.5 (0.4 rounds to the nearer 0.5)
    block = torch.tensor([[6.0, 3.0, -1.5, 0.4] + [0.0] * 12])
    assert dequantize(quantize(block, "nvfp4")).tolist()[0][:4] == pytest.approx([6.0, 3.0, -1.5, 0.5], rel=1e-6)


@pytest.mark.parametrize("name, dtype, fmax", [("fp8_e4m3", torch.float8_e4m3fn, 448.0), ("fp8_e5m2", torch.float8_e5m2, 57344.0)])
def test_fp8_equals_torch_float8_casts(name, dtype, fmax):
    w = weights()
    scale = w.abs().max() / fmax
    assert torch.equal(quantize_dequantize(w, name), (w / scale).to(dtype).float() * scale)
    row_scale = w.abs().amax(1, keepdim=True) / fmax
    row_scale = torch.where(row_scale == 0, torch.ones_like(row_scale), row_scale)
    assert torch.equal(quantize_dequantize(w, f"{name}_channel"), (w / row_scale).to(dtype).float() * row_scale)


@pytest.mark.parametrize("name, ggml", [("q8_0", "Q8_0"), ("q4_0", "Q4_0"), ("q4_1", "Q4_1"), ("mxfp4", "MXFP4"),
                                        ("int4_g32", "Q4_0"), ("int4_g32_asym", "Q4_1")])
def test_gguf_grids_pack_to_the_bytes_gguf_writes(name, ggml):
    import gguf

    for seed in range(3):
        w = weights(seed=seed)
        data, kind = pack(quantize(w, name))
        assert kind.name == ggml
        reference = gguf.quants.quantize(w.numpy(), kind)
        assert np.array_equal(data, reference)
        assert np.array_equal(gguf.quants.dequantize(reference, kind), quantize_dequantize(w, name).numpy())


@pytest.mark.parametrize("name, ggml", [("nvfp4_gguf", "NVFP4"), ("ternary_b256", "TQ2_0"), ("ternary_b256", "TQ1_0")])
def test_layouts_gguf_can_only_read_dequantize_to_our_values(name, ggml):
    import gguf

    w = weights()
    q = quantize(w, name)
    data, kind = pack(q, ggml)
    assert kind.name == ggml
    assert np.array_equal(gguf.quants.dequantize(data, kind).reshape(w.shape), dequantize(q).numpy())


def test_q1_0_packs_the_bytes_llama_cpp_quantizer_writes(tmp_path):
    """gguf 0.19 cannot read Q1_0; llama.cpp's own quantizer is the reference."""
    import ctypes

    import gguf
    import llama_cpp
    from transformers import AutoModelForCausalLM, LlamaConfig

    from shrink.export.gguf import export_gguf
    from shrink.families import spec_from_model
    from shrink.model import LoadedModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=64)
    model = AutoModelForCausalLM.from_config(config).eval()
    export_gguf(LoadedModel(model, None, spec_from_model(model), "m"), tmp_path / "bf16.gguf", quant="bf16")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q1_0
    assert llama_cpp.llama_model_quantize(str(tmp_path / "bf16.gguf").encode(), str(tmp_path / "q1.gguf").encode(),
                                          ctypes.byref(params)) == 0
    source = {t.name: t for t in gguf.GGUFReader(str(tmp_path / "bf16.gguf")).tensors}
    checked = 0
    for tensor in gguf.GGUFReader(str(tmp_path / "q1.gguf")).tensors:
        if tensor.tensor_type.name != "Q1_0":
            continue
        bf16 = source[tensor.name]
        values = gguf.quants.dequantize(bf16.data, bf16.tensor_type)
        ours, _ = pack(quantize(torch.from_numpy(values.copy()), "binary_b128"))
        assert np.array_equal(ours, np.asarray(tensor.data).reshape(ours.shape)), tensor.name
        checked += 1
    assert checked >= 4


# |dequantized - x| <= bound x (largest |x| of the group sharing a scale), per grid
ERROR_BOUNDS = {"q8_0": 0.5 / 127 * 1.01, "q4_0": 1 / 8 * 1.01, "q4_1": 0.5 / 15 * 1.01, "mxfp4": 0.25,
                "nvfp4": 0.25, "nvfp4_gguf": 0.25, "fp8_e4m3": 2 ** -4, "fp8_e5m2": 2 ** -3,
                "fp8_e4m3_channel": 2 ** -4, "fp8_e5m2_channel": 2 ** -3, "int8": 0.5 / 127 * 1.01,
                "int4_g32": 1 / 8 * 1.01, "int4_g64": 1 / 8 * 1.01, "int4_g128": 1 / 8 * 1.01,
                "int4_g32_asym": 0.5 / 15 * 1.01, "int4_g64_asym": 0.5 / 15 * 1.01, "int4_g128_asym": 0.5 / 15 * 1.01}
# the absmean grids are not idempotent: the mean of |codes x scale| is not the scale
NOT_IDEMPOTENT = {"ternary", "ternary_b256", "binary"}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10 ** 6), scale=st.floats(1e-3, 10.0), name=st.sampled_from(sorted(GRIDS)))
def test_error_bounds_idempotence_and_zeros(seed, scale, name):
    w = weights(rows=3, cols=256, seed=seed) * scale
    q = quantize(w, name)
    out = dequantize(q)
    assert torch.isfinite(out).all() and torch.equal(out[1], torch.zeros(256))
    if name in ERROR_BOUNDS:
        group = GRIDS[name].block if GRIDS[name].block > 0 else (256 if GRIDS[name].block == 0 else 768)
        magnitude = w.abs().reshape(-1, group).amax(1, keepdim=True)
        step_base = magnitude
        if name.endswith("asym") or name == "q4_1":  # the range, not the magnitude, sets the step
            step_base = w.reshape(-1, group).amax(1, keepdim=True) - w.reshape(-1, group).amin(1, keepdim=True)
        # fp16-stored scales (and minima) add up to 2^-11 relative per code step: 2^-6 of the magnitude
        fp16_slack = 2 ** -6 * magnitude if GRIDS[name].bits in (8.5, 4.5, 5.0) or name.startswith("int4") else 0
        error = (out - w).abs().reshape(-1, group)
        assert (error <= ERROR_BOUNDS[name] * step_base + fp16_slack + 1e-6 * scale).all()
    if name not in NOT_IDEMPOTENT:
        assert torch.equal(quantize_dequantize(out, name), out)
    assert torch.equal(dequantize(from_grid_values(out, name)), out)  # what export reads back


def test_effective_bits_count_the_scales():
    shape = (1024, 2048)
    expected = {"q4_0": 4.5, "q8_0": 8.5, "mxfp4": 4.25, "nvfp4_gguf": 4.5, "int4_g128": 4.125, "binary_b128": 1.125,
                "ternary_b256": 2.0625, "int8": 8 + 32 / 2048, "nvfp4": 4.5 + 32 / (1024 * 2048)}
    for name, bits in expected.items():
        assert effective_bits(name, shape) == pytest.approx(bits)


def test_unknown_grids_and_rows_that_do_not_divide_are_refused():
    with pytest.raises(ShrinkError, match="Unknown weight grid"):
        quantize(weights(), "int3")
    with pytest.raises(ShrinkError, match="not a multiple of q4_0's 32"):
        quantize(torch.zeros(2, 48), "q4_0")
    with pytest.raises(ShrinkError, match="no GGUF layout"):
        pack(quantize(weights(), "int8"))


def test_fake_quant_forward_is_the_grid_and_gradients_pass_inside_the_range_only():
    w = torch.tensor([[0.1, -0.2, 0.05, 3.0] * 64], requires_grad=True)  # 3.0 saturates the ternary grid
    out = fake_quant(w, "ternary")
    assert torch.equal(out.detach(), quantize_dequantize(w.detach(), "ternary"))
    out.sum().backward()
    assert w.grad[0, 3] == 0 and (w.grad[0, :3] == 1).all()
    w.grad = None
    fake_quant(w, "q4_0").sum().backward()  # absmax scales clip nothing
    assert (w.grad == 1).all()
    layer = torch.nn.Linear(64, 8)
    fq = FakeQuantLinear(layer, "q8_0", activations="fp8_e4m3")
    x = torch.randn(3, 64)
    expected = torch.nn.functional.linear(quantize_dequantize(x, "fp8_e4m3_channel"), quantize_dequantize(layer.weight, "q8_0"), layer.bias)
    assert torch.allclose(fq(x), expected)
