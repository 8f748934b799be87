"""Weight formats against independent references: gguf's quantizers and dequantizers (gguf 0.19), a
written-out reading of llama.cpp's Q1_0 code (gguf 0.19 has the type but no Q1_0 (de)quantizer),
torch's float8 casts, the E2M1/E4M3 tables and hand-computed examples; hypothesis properties for the
rounding error, idempotence and zeros of every format; the straight-through estimator's gradient."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

from shrink.compress.quant.fakequant import FakeQuantLinear, fake_quant, quantized_grid_weight
from shrink.numformats.grids import (
    E2M1_VALUES, FORMATS, IDEMPOTENT, KQUANTS, UE4M3_VALUES, QTensor, _e2m1_code, _ggml_ue4m3, block_size, clipped,
    dequantize, e2m1_round, e4m3_round, effective_bits, element_scale, quantize, quantize_dequantize,
)
from shrink.errors import ShrinkError

FP8 = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def weights(rows=6, cols=512, seed=0, scale=0.05):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    w[0, :70] = 0  # zero blocks of every size up to 64
    w[1] = 0  # an all-zero row
    w[-1, 3] = 0.9  # an outlier
    return w


def adversarial():
    """Blocks of 32 aimed at the gguf rounding rules: exact ties of Q8_0 (d = 1), Q4_0 (d = 1) and
    Q4_1 (d = 1, min 0) and of E2M1 (MXFP4 scale 1), equal-magnitude maxima of both signs, powers of two
    and the float32 just below them (MXFP4's float32 log2), fp16-subnormal and large scales, zeros."""
    half = [k + 0.5 for k in range(-16, 16)]
    rows = [[127.0] + half[:31],
            [-8.0] + half[8:24] + [-v for v in half[9:24]],
            [0.0, 15.0] + half[16:31] * 2,
            [-8.0, 8.0] + [0.5 * k for k in range(30)],  # the first of equal maxima sets the sign
            [8.0, -8.0] + [-0.5 * k for k in range(30)],
            [float(np.nextafter(np.float32(2.0 ** k), np.float32(0))) for k in range(-20, 12)],
            [2.0 ** k for k in range(-16, 16)],
            [v * s for v in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0) for s in (1, -1)] * 2,
            torch.linspace(-3, 3, 32) * 1e-4, torch.linspace(-1, 1, 32) * 3e-6, torch.linspace(-1, 1, 32) * 3e4,
            [0.0] * 32]
    return torch.stack([torch.as_tensor(r, dtype=torch.float32) for r in rows]).reshape(3, -1)


# ---- the element tables -------------------------------------------------------------------------

def test_e2m1_codes_decode_to_the_fp4_table_and_round_ties_to_even():
    magnitudes = [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    for code in range(16):
        assert E2M1_VALUES[code] == (-1) ** (code >> 3) * magnitudes[code & 7]
        value = torch.tensor([E2M1_VALUES[code]])
        assert e2m1_round(value).item() == value.item()
        assert _e2m1_code(value).item() == (code if code != 8 else 0)  # -0 is written as code 0
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, -0.25, -2.5])
    assert e2m1_round(midpoints).tolist() == [0, 1, 1, 2, 2, 4, 4, 6, 0, -2]  # even mantissa; 6 saturates
    assert [E2M1_VALUES[c] for c in _e2m1_code(midpoints).tolist()] == [0, 1, 1, 2, 2, 4, 4, 6, 0, -2]


def test_e4m3_rounding_is_torch_float8_e4m3fn_and_ue4m3_is_gguf():
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    finite = every[torch.isfinite(every)]
    assert finite.numel() == 254 and torch.equal(e4m3_round(finite), finite)
    assert torch.equal(torch.tensor(UE4M3_VALUES[:0x7F]), every[:0x7F])  # unsigned = the positive half
    g = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(4000, generator=g) * 10.0 ** torch.randint(-4, 3, (4000,), generator=g),
                   (torch.rand(2000, generator=g) - 0.5) * 920, finite + 2.0 ** -12, (finite[1:] + finite[:-1]) / 2])
    assert torch.equal(e4m3_round(x), x.to(torch.float8_e4m3fn).float())
    assert torch.equal(e4m3_round(torch.tensor([1e4, -500.0])), torch.tensor([448.0, -448.0]))  # saturates
    # llama.cpp's own UE4M3 encoder (round half up, >= 256 -> 448, subnormal quirks) and decoder
    from gguf.quants import NVFP4
    y = torch.cat([x.abs(), torch.tensor([0.0, 255.9, 256.0, 300.0, 7.5 / 512, 0.49 / 512, 0.5 / 512, 1e-30])])
    assert np.array_equal(_ggml_ue4m3(y).numpy(), NVFP4.fp32_to_ue4m3(y.numpy()))
    decoded = NVFP4.ue4m3_to_fp32(np.arange(128, dtype=np.uint8))
    assert np.array_equal(decoded, np.array(UE4M3_VALUES, dtype=np.float32) * np.float32(0.5))


# ---- NVFP4 (Model-Optimizer) ---------------------------------------------------------------------

def test_nvfp4_hand_example():
    # amax 10.5 -> tensor scale 10.5 / 2688 = 2^-8; block 0: 10.5 / (6 * 2^-8) = 448 (exact in E4M3),
    # so its elements are x / 1.75 on E2M1, ties to even; block 1: 0.3 / (6 * 2^-8) = 12.8 -> E4M3 13
    # (quantum 1 between 8 and 16), element scale 13 * 2^-8; block 2 all zero: scale 1, values 0.
    units = [6, 3, -1.5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5, 5.5, -0.25, -0.75, 0, 0.1, -4.9]
    expect = [6, 3, -1.5, 0, 1, 1, 2, 2, 4, 4, 6, 0, -1, 0, 0, -4]
    w = torch.zeros(1, 48)
    w[0, :16] = torch.tensor(units) * 1.75
    w[0, 16:19] = torch.tensor([0.3, -0.1, 0.01])
    q = quantize(w, "nvfp4")
    assert q.tensor_scale == 2.0 ** -8 and q.scales.tolist() == [[448.0, 13.0, 1.0]]
    out = dequantize(q)[0]
    assert out[:16].tolist() == [1.75 * v for v in expect]
    # 0.3 / (13/256) = 5.91 -> 6; -0.1 -> -1.97 -> -2; 0.01 -> 0.197 -> 0
    assert out[16:19].tolist() == [6 * 13 / 256, -2 * 13 / 256, 0.0] and not out[19:].any()


def test_nvfp4_values_lie_on_e2m1_times_e4m3_times_the_tensor_scale():
    w = weights()
    q = quantize(w, "nvfp4")
    assert q.tensor_scale == float(w.abs().max() / (6.0 * 448.0))  # float32 amax / 2688, as Model-Optimizer
    assert torch.equal(q.scales, q.scales.to(torch.float8_e4m3fn).float()) and (q.scales > 0).all()
    per_block = q.scales * torch.tensor(q.tensor_scale)  # one float32 product, as Model-Optimizer
    grid = torch.tensor(E2M1_VALUES).reshape(1, 1, -1) * per_block.repeat_interleave(16, 1).unsqueeze(-1)
    assert ((grid - dequantize(q).unsqueeze(-1)).abs().amin(-1) == 0).all()


def _modelopt_nvfp4(w):
    """Model-Optimizer's NVFP4QTensor.quantize + dequantize (modelopt/torch/quantization/qtensor/
    nvfp4_tensor.py), written out: searchsorted over the E2M1 midpoints, odd midpoints round up."""
    bounds = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    values = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
    tensor_scale = w.abs().max().float() / (6.0 * 448.0)
    blocks = w.view(w.shape[0], -1, 16)
    block_scale = blocks.abs().amax(-1).float() / (6.0 * tensor_scale)
    block_scale[block_scale == 0] = 1.0
    per_block = (block_scale.to(torch.float8_e4m3fn).to(torch.float32) * tensor_scale).unsqueeze(-1)
    scaled = blocks / per_block
    ordinal = torch.searchsorted(bounds, scaled.abs().contiguous(), out_int32=True).to(torch.uint8)
    odd = torch.any(scaled.abs().unsqueeze(-1) == bounds[[1, 3, 5]], dim=-1).to(torch.uint8)
    code = ((scaled < 0).to(torch.uint8) << 3) + ordinal + odd
    return (values[code.long()] * per_block).reshape(w.shape)


def test_nvfp4_is_model_optimizer_bit_for_bit():
    for w in (weights(), weights(3, 256, seed=5, scale=3.0), adversarial()):
        assert torch.equal(quantize_dequantize(w, "nvfp4"), _modelopt_nvfp4(w))


# ---- FP8 -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["e4m3", "e5m2"])
def test_fp8_is_torch_float8_cast(kind):
    w = weights()
    fmax = 448.0 if kind == "e4m3" else 57344.0
    for name, amax in ((f"fp8_{kind}", w.abs().max().reshape(1, 1)),
                       (f"fp8_{kind}_channel", w.abs().amax(1, keepdim=True))):
        q = quantize(w, name)
        scale = q.scales
        # the scale is amax / fmax, moved by at most 2 ulps onto a float32 that re-quantizing finds again
        assert torch.allclose(scale, amax / fmax, rtol=2.5e-7, atol=0)
        safe = torch.where(scale == 0, 1.0, scale)
        assert torch.equal(dequantize(q), (w / safe).to(FP8[kind]).float() * scale)
        assert torch.equal(q.codes, (w / safe).to(FP8[kind]).view(torch.uint8))


# ---- properties of every format ----------------------------------------------------------------

INTEGER_LEVELS = {"int8": (-127, 127), "q8_0": (-127, 127), "int8_g32": (-128, 127), "q4_0": (-8, 7),
                  "q4_1": (0, 15), "q5_0": (-16, 15), "q5_1": (0, 31), "q4_k": (0, 15), "q5_k": (0, 31),
                  "q6_k": (-32, 31), "ternary": (-1, 1), "ternary_b256": (-1, 1),
                  **{f"int4_g{n}": (-8, 7) for n in (32, 64, 128)}, **{f"int4_g{n}_asym": (0, 15) for n in (32, 64, 128)}}
# largest |x - zero| / scale the scale rule allows: the signed-max rules one step past the far end,
# MXFP4's power of two up to 8 (amax < 2^(e+1)), E4M3 block scales their rounding (normal scales only)
CAPS = {**{n: 8 * (1 + 2.0 ** -10) for n in ("q4_0", "int4_g32", "int4_g64", "int4_g128")}, "int8_g32": 128.0,
        "q5_0": 16 * (1 + 2.0 ** -10),
        "mxfp4": 8.0, "nvfp4": 6.375, "nvfp4_gguf": 6.4}


def _levels(name):
    """Every grid value in units of the element scale (the grid is levels * scale (+ zero))."""
    if name in ("nvfp4", "nvfp4_gguf", "mxfp4"):
        return torch.tensor(E2M1_VALUES)
    if name.startswith("fp8"):
        values = torch.arange(256, dtype=torch.uint8).view(FP8[name[4:8]]).float()
        return values[torch.isfinite(values)]
    if name.startswith("binary"):
        return torch.tensor([-1.0, 1.0])
    first, last = INTEGER_LEVELS[name]
    return torch.arange(first, last + 1).float()


def _check_rounding(name, w):
    """Every element is the grid point nearest to it, given the stored scales (so within half the local
    step inside the grid's range, the distance to the extreme outside it), and the scale rule covers the
    block (CAPS; the absmax scales clip nothing, the absmean ones anything: they clip by design)."""
    q = quantize(w, name)
    out = dequantize(q)
    if name == "f16":  # no scale: torch's round-to-nearest-even cast
        assert torch.equal(out, w.half().float())
        return q, out
    scale = element_scale(q)
    zero = torch.repeat_interleave(q.zeros, w.shape[1] // q.zeros.shape[1], 1) if q.zeros is not None else None
    levels = _levels(name)
    grid = levels * scale.unsqueeze(-1) + (zero.unsqueeze(-1) if zero is not None else 0.0)
    nearest = (grid.double() - w.double().unsqueeze(-1)).abs().amin(-1)
    top = levels.abs().max().item()
    slack = 1e-6 * top * scale.abs().double()  # float32 rounding of x / scale next to a tie
    if name in ("q4_k", "q5_k"):  # codes of (x + dmin*m) / (d*sc): x + dmin*m rounds in float32
        slack = slack + zero.abs().double() * 2.0 ** -23
    if name in ("q8_0", "q4_0", "q4_1", "q5_0", "q5_1"):  # gguf picks codes with the unrounded scale (and min), stores them fp16
        slack = slack + top * torch.clamp(scale.abs().double() * 2.0 ** -11, min=2.0 ** -25)
        slack = slack + (zero.abs().double() * 2.0 ** -11 + 2.0 ** -25 if zero is not None else 0)
    error = (out.double() - w.double()).abs()
    assert (error <= nearest + slack).all(), (name, float((error - nearest - slack).max()))
    if name.startswith(("ternary", "binary")) or name in KQUANTS:  # K-quants: 6-bit sub-scales round
        return q, out  # down as well as up, and their search may clip on purpose
    if name not in CAPS:
        assert not clipped(w, q).any(), name  # absmax: nothing beyond half a step past the extreme
        return q, out
    units = torch.where(scale == 0, 0.0, w / scale).abs()
    normal = {"nvfp4_gguf": scale.abs() >= 2.0 ** -6, "nvfp4": q.scales.repeat_interleave(16, 1) >= 2.0 ** -6}.get(
        name, torch.ones_like(w, dtype=torch.bool))
    assert (units[normal] <= CAPS[name]).all(), (name, float(units[normal].max()))
    return q, out


@st.composite
def weight_cases(draw, name):
    rows, cols = draw(st.integers(1, 3)), max(block_size(name), 32) * draw(st.integers(1, 2))
    scale = 10.0 ** draw(st.integers(-2, 2))
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(draw(st.integers(0, 2 ** 16)))) * scale
    if draw(st.booleans()):
        w[w.abs() < scale / 2] = 0  # sparse
    if draw(st.booleans()):
        w[draw(st.integers(0, rows - 1)), : max(block_size(name), 16)] = 0  # a zero block
    special = st.floats(-1e3, 1e3, width=32, allow_subnormal=False).filter(lambda v: v == 0 or abs(v) >= 1e-2)
    values = draw(st.lists(special, max_size=8))
    w[0, : len(values)] = torch.tensor(values, dtype=torch.float32)
    return w


@pytest.mark.parametrize("name", list(FORMATS))
@settings(max_examples=12, deadline=None, derandomize=True)
@given(data=st.data())
def test_every_format_rounds_to_nearest_is_idempotent_and_keeps_zeros(name, data):
    w = data.draw(weight_cases(name))
    q, out = _check_rounding(name, w)
    assert not out.isnan().any()
    if not name.startswith("binary") and q.zeros is None:  # zeros stay zero (binary: sign(0) = +1; the
        # asymmetric grids min + k * scale need not hold 0)
        assert not out[w == 0].any()
    if name in IDEMPOTENT:  # re-quantizing a quantized weight gives back the same values
        assert torch.equal(quantize_dequantize(out, name), out)
    zero = quantize_dequantize(torch.zeros_like(w), name)
    assert torch.equal(zero, torch.zeros_like(w))


def test_effective_bits():
    shape = (64, 1024)
    numel = 64 * 1024
    expected = {"q4_0": 4.5, "q8_0": 8.5, "q4_1": 5.0, "nvfp4": 4.5 + 32 / numel, "nvfp4_gguf": 4.5, "mxfp4": 4.25,
                "int4_g128": 4.125, "int4_g32": 4.5, "int4_g128_asym": 4.25, "ternary_b256": 2.0625,
                "binary_b128": 1.125, "int8": 8 + 32 / 1024, "fp8_e4m3": 8 + 32 / numel,
                "fp8_e4m3_channel": 8 + 32 / 1024, "binary": 1 + 32 / 1024, "ternary": 2 + 32 / numel,
                "int8_g32": 9.0, "f16": 16.0, "q5_0": 5.5, "q5_1": 6.0, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625}
    for name, bits in expected.items():
        assert effective_bits(name, shape) == pytest.approx(bits), name
    assert effective_bits("ternary_b256", shape, "TQ1_0") == pytest.approx(1.6875)
    for name, ggml in (("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("mxfp4", T.MXFP4), ("nvfp4_gguf", T.NVFP4), ("q5_0", T.Q5_0),
                       ("q5_1", T.Q5_1), ("q4_k", T.Q4_K), ("q5_k", T.Q5_K), ("q6_k", T.Q6_K),
                       ("ternary_b256", T.TQ2_0), ("binary_b128", T.Q1_0)):  # = the GGUF block sizes
        elements, size = gguf.GGML_QUANT_SIZES[ggml]
        assert effective_bits(name, shape) == pytest.approx(8 * size / elements), name


def test_unknown_formats_and_shapes_say_what_is_wrong():
    with pytest.raises(ShrinkError, match="Unknown weight format 'int3'"):
        quantize(weights(), "int3")
    with pytest.raises(ShrinkError, match=r"columns \(48\) must be a multiple of 64"):
        quantize(torch.zeros(2, 48), "nvfp4_gguf")
    with pytest.raises(ShrinkError, match="2-D"):
        quantize(torch.zeros(32), "q8_0")


# ---- fake quantization --------------------------------------------------------------------------

@pytest.mark.parametrize("name, w, inside", [
    # ternary: scale = mean|w| = 0.81875; 3.0 and -2.0 are beyond 1.5 scales, 0.9 rounds to 1
    ("ternary", [0.1, -0.2, 0.3, 3.0, -0.05, 0.0, 0.9, -2.0], [1, 1, 1, 0, 1, 1, 1, 0]),
    # q4_0: the first largest magnitude -1 sets d = 0.125; +1 is 8 steps, past 7.5, and saturates at 7
    ("q4_0", [-1.0, 1.0, 0.93] + [0.01] * 29, [1, 0, 1] + [1] * 29),
    # mxfp4: amax 1.9 -> scale 2^(0 - 2) = 0.25; 1.9 = 7.6 and -1.8 = 7.2 units (> 7) clip to 6, 1.7 rounds
    ("mxfp4", [1.9, 1.7, -1.8] + [0.01] * 29, [0, 1, 0] + [1] * 29),
])
def test_fake_quant_gradient_passes_inside_and_stops_where_clipped(name, w, inside):
    weight = torch.tensor([w], requires_grad=True)
    out = fake_quant(weight, name)
    assert torch.equal(out, quantize_dequantize(weight.detach(), name))
    upstream = torch.arange(1.0, len(w) + 1).reshape(1, -1)
    (out * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream * torch.tensor([inside], dtype=torch.float32))


def test_absmax_formats_pass_every_gradient():
    w = weights(4, 256).requires_grad_(True)
    for name in ("q8_0", "int8", "fp8_e4m3", "nvfp4", "nvfp4_gguf", "int4_g128_asym"):
        w.grad = None
        fake_quant(w, name).sum().backward()
        assert torch.equal(w.grad, torch.ones_like(w)), name


def test_fake_quant_linear_uses_its_grid_per_token_activations_and_trains():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8)
    module = FakeQuantLinear(linear, "q4_0", activations="fp8_e4m3")
    x = torch.randn(2, 3, 64)
    tokens = quantize_dequantize(x.reshape(6, 64), "fp8_e4m3_channel").reshape(2, 3, 64)  # a scale per token
    expected = torch.nn.functional.linear(tokens, quantized_grid_weight(module), linear.bias)
    out = module(x)
    assert torch.equal(out, expected)
    out.square().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    with pytest.raises(ShrinkError, match="multiple of 128"):
        FakeQuantLinear(torch.nn.Linear(96, 8), "binary_b128")


def test_qtensor_holds_codes_and_exact_scales():
    q = quantize(weights(), "q4_0")
    assert isinstance(q, QTensor) and q.shape == (6, 512) and q.codes.dtype == torch.int8
    assert q.scales.shape == (6, 16) and torch.equal(q.scales, q.scales.half().float())
    assert int(q.codes.min()) >= -8 and int(q.codes.max()) <= 7
