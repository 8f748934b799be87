"""GGUF K-quants (Q4_K, Q5_K, Q6_K) and Q5_0 / Q5_1 against llama.cpp itself: its reference quantizers
and dequantizers called from the libggml-base that llama-cpp-python ships, gguf's dequantizers, and
llama.cpp running a Q4_K student (with its Q5_0 fallback) exported by shrink."""

import ctypes
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from shrink.numformats import kquants
from shrink.numformats.ggufpack import pack
from shrink.numformats.grids import _kquant, dequantize, from_grid_values, quantize

KQUANTS = [("q4_k", T.Q4_K), ("q5_k", T.Q5_K), ("q6_k", T.Q6_K)]


def _libggml():
    import llama_cpp

    return ctypes.CDLL(str(Path(llama_cpp.__file__).parent / "lib" / "libggml-base.so"))


def llama_quantize(x: np.ndarray, ggml) -> np.ndarray:
    """quantize_row_<type>_ref of llama.cpp (what llama_model_quantize runs without an imatrix)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    elements, size = gguf.GGML_QUANT_SIZES[ggml]
    out = np.zeros(x.size // elements * size, dtype=np.uint8)
    getattr(_libggml(), f"quantize_row_{ggml.name.lower()[:2]}_{ggml.name[3:]}_ref")(
        ctypes.c_void_p(x.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(x.size))
    return out.reshape(x.shape[0], -1)


def llama_dequantize(packed: np.ndarray, ggml) -> np.ndarray:
    elements, size = gguf.GGML_QUANT_SIZES[ggml]
    packed = np.ascontiguousarray(packed)
    out = np.zeros(packed.size // size * elements, dtype=np.float32)
    getattr(_libggml(), f"dequantize_row_{ggml.name.lower()[:2]}_{ggml.name[3:]}")(
        ctypes.c_void_p(packed.ctypes.data), ctypes.c_void_p(out.ctypes.data), ctypes.c_int64(out.size))
    return out.reshape(packed.shape[0], -1)


def weights(rows=8, cols=1024, seed=0, scale=0.05):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * scale
    w[::3] *= torch.rand(cols, generator=torch.Generator().manual_seed(seed + 1)) ** 4  # uneven sub-blocks
    return w


def adversarial():
    """Rows of 256: all zero, constant of either sign, one sign only, a huge outlier among small values,
    fp16-subnormal scales, half-zero super-blocks, exact ties of the code rounding, large values."""
    g = torch.Generator().manual_seed(7)
    noise = torch.randn(256, generator=g)
    ramp = torch.arange(256.0) / 16 - 8  # 0.5 steps of 1/16: ties of every code rounding
    outlier = noise * 1e-3
    outlier[37] = 1e3
    half = noise.clone()
    half[:128] = 0
    rows = [torch.zeros(256), torch.full((256,), 0.3), torch.full((256,), -0.3), noise.abs(), -noise.abs(),
            outlier, noise * 1e-7, half, ramp, noise * 300.0, (noise > 0).float() * 2 - 1]
    return torch.stack(rows)


DATA = {"random": weights, "adversarial": adversarial}


@pytest.mark.parametrize("name, ggml", KQUANTS)
@pytest.mark.parametrize("data", DATA)
def test_one_reference_pass_is_llama_cpps_quantizer(name, ggml, data):
    """Byte for byte on all but the super-blocks where a sub-block scale search lands within a float32
    ulp of an fp16 rounding tie (llama.cpp's compiled search rounds one ulp differently there)."""
    w = DATA[data]()
    params, _ = kquants._reference(w.reshape(-1, 256), name)
    ours, kind = pack(_kquant(name, tuple(w.shape), params))
    theirs = llama_quantize(w.numpy(), ggml)
    assert kind == ggml and ours.shape == theirs.shape
    per_block = ours.shape[1] * 256 // w.shape[1]
    same = (ours.reshape(-1, per_block) == theirs.reshape(-1, per_block)).all(-1)
    if data == "random":
        assert same.mean() >= 0.97, (name, int((~same).sum()))
    else:  # every value; every byte but the sub-scales of a super-block whose fp16 d is 0
        assert np.array_equal(gguf.quants.dequantize(ours, ggml), gguf.quants.dequantize(theirs, ggml))
        assert same[params[1].reshape(-1).numpy() != 0].all()


@pytest.mark.parametrize("name, ggml", KQUANTS + [("q5_0", T.Q5_0), ("q5_1", T.Q5_1)])
@pytest.mark.parametrize("data", DATA)
def test_llama_cpp_reads_back_exactly_what_the_grid_holds(name, ggml, data):
    w = DATA[data]()
    q = quantize(w, name)
    packed, kind = pack(q)
    assert kind == ggml and packed.shape == (w.shape[0], w.shape[1] // gguf.GGML_QUANT_SIZES[ggml][0]
                                              * gguf.GGML_QUANT_SIZES[ggml][1])
    values = dequantize(q).numpy()
    assert np.array_equal(gguf.quants.dequantize(packed, ggml), values)
    assert np.array_equal(llama_dequantize(packed, ggml), values)
    if ggml in (T.Q5_0, T.Q5_1):  # gguf's own quantizer makes these: the same bytes
        assert np.array_equal(packed, gguf.quants.quantize(w.numpy(), ggml))
    else:  # K-quants: within a step of the weight (nearest code for the stored scales, or clipped)
        assert np.abs(values - w.numpy()).max() <= np.abs(w.numpy()).max() * 0.5 + 1e-30


@pytest.mark.parametrize("name, ggml", KQUANTS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_trained_students_grid_is_found_again(name, ggml, seed):
    """What export does with a QAD student: from the on-grid values alone, scales that give them back
    exactly (also for super-blocks where the reference, re-run, would choose other scales)."""
    w = weights(32, 1024, seed=seed)
    grid = dequantize(quantize(w, name))
    # the settled projection is a fixed point nearly everywhere (re-quantizing gives it back); the rest is recovered
    again = dequantize(quantize(grid, name))
    q = from_grid_values(grid, name)
    assert torch.equal(dequantize(q), grid)
    packed, _ = pack(q)
    assert np.array_equal(gguf.quants.dequantize(packed, ggml), grid.numpy())
    assert (again != grid).reshape(-1, 256).any(-1).float().mean() < 0.05  # measured 0-2%


def test_recover_finds_scales_the_reference_would_not():
    # Q5_K values on a grid the reference, re-run, moves away from: 7 sub-blocks spanning codes 0..31
    # and one using 3..12 only (its re-run search picks a finer scale); recover finds d, dmin, sc, m
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(0, 32, (1, 8, 32), generator=g).float()
    codes[0, 5] = torch.randint(3, 13, (32,), generator=g).float()
    d, dmin = torch.tensor([2.0 ** -12 * 1.25]), torch.tensor([2.0 ** -10 * 1.5])
    sc = torch.tensor([[63.0, 40, 41, 50, 33, 7, 60, 12]])
    m = torch.tensor([[63.0, 20, 30, 1, 0, 9, 44, 17]])
    x = kquants.values_qk(codes, d, dmin, sc, m).reshape(1, 256)
    _, values = kquants._reference(x, "q5_k")
    assert not torch.equal(values, x)  # one reference pass does not give it back
    q = from_grid_values(x, "q5_k")
    assert torch.equal(dequantize(q), x)


def test_fallbacks_are_llama_cpps():
    from shrink.numformats.registry import FORMATS, fitting_format

    # llama-quant.cpp, for rows its blocks do not divide: Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0
    assert [fitting_format(FORMATS[n], [640]).name for n in ("q4_k", "q5_k", "q6_k")] == ["q5_0", "q5_1", "q8_0"]
    assert all(FORMATS[n].grid == n for n in ("q4_k", "q5_k", "q6_k", "q5_0", "q5_1"))


def test_q4_k_student_exports_its_k_quant_blocks_and_llama_cpp_runs_it(tiny_model, tmp_path):
    from shrink.compress.quant.plan import make_plan
    from shrink.compress.quant.student import fake_quantize, materialize
    from shrink.export.gguf import export_gguf
    from shrink.export.runtimes import LlamaCppRunner, TorchRunner
    from shrink.export.verify import compare

    # rows of 256 (attention, gate, up: Q4_K) and of 320 (down: llama.cpp's Q5_0 fallback)
    loaded = tiny_model("llama", hidden_size=256, intermediate_size=320, num_hidden_layers=2, head_dim=64)
    plan = make_plan(loaded.model, "q4_k", "gguf")
    assert {t.module.rsplit(".", 1)[1]: t.stored for t in plan.tensors}["down_proj"] == "q5_0"
    assert {t.stored for t in plan.tensors} == {"q4_k", "q5_0"} and plan.vocabulary == "q8_0"
    fake_quantize(loaded.model, plan)
    with torch.no_grad():  # training moves the weights; the grid follows them
        for p in loaded.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 1e-3)
    materialize(loaded.model, plan)
    path = tmp_path / "q4_k.gguf"
    report = export_gguf(loaded, path)
    assert report.tensor_types["blk.0.attn_q.weight"] == "Q4_K" and report.tensor_types["blk.1.ffn_up.weight"] == "Q4_K"
    assert report.tensor_types["blk.0.ffn_down.weight"] == "Q5_0" and report.tensor_types["token_embd.weight"] == "Q8_0"
    stored = {t.name: t for t in gguf.GGUFReader(str(path)).tensors}
    layer = loaded.model.model.layers[1]
    for name, weight in (("blk.1.attn_v.weight", layer.self_attn.v_proj.weight),  # (q, k: rows permuted for RoPE)
                         ("blk.1.ffn_down.weight", layer.mlp.down_proj.weight)):
        tensor = stored[name]
        np.testing.assert_array_equal(gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(weight.shape),
                                      weight.detach().numpy())
    metrics = compare(TorchRunner(loaded.model), LlamaCppRunner(path, 64), [list(range(1, 41)), [7, 3, 99, 42] * 8])
    # the same weights; llama.cpp rounds the activations to 8 bits (Q8_K / Q8_0) for its dot products
    assert metrics.top1_agreement >= 0.95 and metrics.mean_kl < 1e-3, metrics
