"""GGUF grids and packing against independent references: gguf's quantizers and dequantizers (gguf
0.19), llama.cpp's NVFP4 reference and its own Q1_0 quantizer; what a grid holds is what a GGUF reads back."""

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from hypothesis import given, settings
from hypothesis import strategies as st

from shrink.errors import ShrinkError
from shrink.numformats.ggufpack import pack
from shrink.numformats.grids import UE4M3_VALUES, dequantize, quantize
from test_quant_formats import adversarial, weight_cases, weights

# ---- GGUF grids -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, ggml", [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("mxfp4", T.MXFP4)])
@pytest.mark.parametrize("data", ["random", "adversarial"])
def test_gguf_grids_are_gguf_bit_for_bit(name, ggml, data):
    w = weights() if data == "random" else adversarial()
    q = quantize(w, name)
    packed, kind = pack(q)
    reference = gguf.quants.quantize(w.numpy(), ggml)
    assert kind == ggml and packed.shape == reference.shape and np.array_equal(packed, reference)
    assert np.array_equal(dequantize(q).numpy(), gguf.quants.dequantize(reference, ggml))


GGUF = [("q8_0", T.Q8_0), ("q4_0", T.Q4_0), ("q4_1", T.Q4_1), ("mxfp4", T.MXFP4), ("nvfp4_gguf", T.NVFP4),
        ("ternary_b256", T.TQ2_0), ("ternary_b256", T.TQ1_0), ("binary_b128", T.Q1_0), ("q5_0", T.Q5_0),
        ("q5_1", T.Q5_1), ("q4_k", T.Q4_K), ("q5_k", T.Q5_K), ("q6_k", T.Q6_K)]


@pytest.mark.parametrize("name, ggml", GGUF)
@settings(max_examples=10, deadline=None, derandomize=True)
@given(data=st.data())
def test_gguf_reads_back_exactly_what_the_format_holds(name, ggml, data):
    w = data.draw(weight_cases(name))
    q = quantize(w, name)
    packed, kind = pack(q, ggml)
    assert kind == ggml
    if ggml in (T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.MXFP4):  # the same grid as gguf's quantizer: the same bytes
        assert np.array_equal(packed, gguf.quants.quantize(w.numpy(), ggml))
    read = _llama_dequantize_q1_0(packed) if ggml == T.Q1_0 else gguf.quants.dequantize(packed, ggml)
    assert np.array_equal(read, dequantize(q).numpy())


def _best_index(x, d):  # llama.cpp best_index_mxfp4: argmin over the doubled table, first index on ties
    table = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=np.float32)
    return np.abs(d.reshape(-1, 1, 1) * table - x[..., None]).argmin(-1)


def test_nvfp4_gguf_is_llama_cpp_reference_and_gguf_reads_it_back():
    w = torch.cat([weights(4, 512), weights(4, 512, seed=2, scale=0.004),  # subnormal UE4M3 scales
                   weights(2, 512, seed=3, scale=600.0)])  # scales >= 256, which llama.cpp writes as 448
    q = quantize(w, "nvfp4_gguf")
    packed, kind = pack(q)
    assert kind == T.NVFP4 and packed.shape == (10, 512 // 64 * 36)
    assert np.array_equal(gguf.quants.dequantize(packed, T.NVFP4), dequantize(q).numpy())
    # quantize_row_nvfp4_ref: byte = ue4m3(amax / 6), codes = best_index_mxfp4(x, ue4m3_to_fp32(byte))
    from gguf.quants import NVFP4
    blocks = w.numpy().reshape(-1, 16)
    byte = NVFP4.fp32_to_ue4m3(np.abs(blocks).max(-1) / np.float32(6))
    codes = _best_index(blocks, NVFP4.ue4m3_to_fp32(byte))
    # (the guard for blocks already on a grid, below, never applies to weights off it)
    assert np.array_equal(q.codes.numpy().reshape(-1, 16), codes)
    assert np.array_equal(q.scales.numpy().reshape(-1), np.array(UE4M3_VALUES, dtype=np.float32)[byte])


def test_nvfp4_gguf_keeps_a_block_that_is_already_on_its_grid():
    # 8/512 at scale 2/512 is E2M1 4; llama.cpp's rule would rescale it to 1/512 (8/512 / 6 -> 1.33/512 -> 1)
    # and round it to 12/1024: the block keeps the scale it is exactly on
    w = torch.zeros(1, 64)
    w[0, :3] = torch.tensor([8.0, -3.0, 1.0]) / 512
    q = quantize(w, "nvfp4_gguf")
    assert torch.equal(dequantize(q), w) and q.scales[0, 0].item() == 2 / 512
    assert np.array_equal(gguf.quants.dequantize(pack(q)[0], T.NVFP4), w.numpy())


@pytest.mark.parametrize("ggml", [T.TQ2_0, T.TQ1_0])
def test_ternary_b256_packs_to_tq_blocks(ggml):
    w = weights(4, 512)
    q = quantize(w, "ternary_b256")
    packed, kind = pack(q, ggml)
    assert kind == ggml and packed.shape == (4, 2 * gguf.GGML_QUANT_SIZES[ggml][1])
    assert np.array_equal(gguf.quants.dequantize(packed, ggml), dequantize(q).numpy())
    # gguf's own TQ quantizer scales by absmax, not absmean: its output is still a ternary grid, which
    # quantizes to its own codes and scale and packs back to gguf's bytes
    theirs = gguf.quants.quantize(w.numpy(), ggml)
    on_grid = torch.from_numpy(gguf.quants.dequantize(theirs, ggml).copy())
    assert np.array_equal(pack(quantize(on_grid, "ternary_b256"), ggml)[0], theirs)


def _llama_q1_0(x):
    """llama.cpp quantize_row_q1_0_ref: d = fp16(float32 running sum of |x| / 128), bit j = x >= 0."""
    blocks = x.reshape(-1, 128)
    d = (np.add.accumulate(np.abs(blocks), axis=1, dtype=np.float32)[:, -1] / np.float32(128)).astype(np.float16)
    bits = np.packbits(blocks >= 0, axis=1, bitorder="little")
    return np.concatenate([d.reshape(-1, 1).view(np.uint8), bits], axis=1).reshape(x.shape[0], -1)


def _llama_dequantize_q1_0(packed):
    """llama.cpp dequantize_row_q1_0: per 18-byte block, y[j] = bit (qs[j/8] >> j%8) & 1 ? d : -d."""
    blocks = packed.reshape(-1, 18)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    bits = (blocks[:, 2 + np.arange(128) // 8] >> (np.arange(128) % 8)) & 1
    return np.where(bits == 1, d, -d).reshape(packed.shape[0], -1)


def test_binary_b128_is_q1_0():
    w = weights(4, 512)
    w[2, 5] = -0.0  # sign(0) = +1, for -0 too
    q = quantize(w, "binary_b128")
    packed, kind = pack(q)
    assert kind == T.Q1_0 and int(kind) == 41 and packed.shape == (4, 4 * 18)
    assert np.array_equal(_llama_dequantize_q1_0(packed), dequantize(q).numpy())
    assert np.array_equal(packed, _llama_q1_0(w.numpy()))
    assert dequantize(q)[2, 5] > 0


def test_f16_packs_as_f16():
    w = weights(2, 96)
    packed, kind = pack(quantize(w, "f16"))
    assert kind == T.F16 and packed.dtype == np.float16 and np.array_equal(packed, w.numpy().astype(np.float16))


def test_pack_refuses_other_formats_and_types():
    with pytest.raises(ShrinkError, match="pack into GGUF blocks, not int8"):
        pack(quantize(weights(), "int8"))
    with pytest.raises(ShrinkError, match="TQ2_0 or TQ1_0, not Q4_0"):
        pack(quantize(weights(), "ternary_b256"), "Q4_0")


def test_q1_0_packs_the_bytes_llama_cpps_own_quantizer_writes(tmp_path):
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
