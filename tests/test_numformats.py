"""The format registry: storage per weight agrees with independent sources (the gguf package's block
sizes, ONNX Runtime's MatMulNBits layout written out by hand), families resolve per runtime, every
stored format has a gate, and the top-1 gate tolerates sampling noise but not a real drop."""

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from shrink.errors import ShrinkError
from shrink.numformats import (COMPUTE_CLASSES, FAMILIES, FORMATS, gate_for, get_format, matmul_compute_class,
                               resolve_weights, stored_format, wilson_interval)


@pytest.mark.parametrize("fmt", [f for f in FORMATS.values() if f.gguf_type], ids=lambda f: f.name)
def test_gguf_bits_per_weight_match_the_gguf_package(fmt):
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[fmt.gguf_type]]
    assert fmt.bits_per_element == 8 * type_size / block
    assert fmt.block in (1, block) and (fmt.block == block or not fmt.quantized)


def test_matmul_nbits_bits_per_weight_hand_computed():
    # 4-bit codes, two per byte, plus one float32 scale per 32 weights: 4 + 32 / 32 = 5.0 bits
    assert get_format("onnx_int4_g32").bits_per_element == 5.0
    # 8-bit codes plus a float32 scale per 128: 8 + 0.25
    assert get_format("onnx_int8_g128").bits_per_element == 8.25


def test_families_resolve_per_runtime():
    assert stored_format("int4", "gguf").name == "q4_0"
    assert stored_format("int4", "onnx").name == "onnx_int4_g32"
    assert stored_format(None, "gguf").name == "fp16"
    assert resolve_weights("int4", "gguf").bits_per_element == 4.5  # the same grid `shrink quantize` writes
    assert resolve_weights("q6_k", "onnx").name == "q6_k"  # a stored name stays itself
    with pytest.raises(ShrinkError, match="fp8 exports to: onnx"):
        stored_format("fp8", "gguf")


def test_a_family_is_not_a_stored_format():
    with pytest.raises(ShrinkError, match="is a family: q4_0 in gguf"):
        get_format("int4")


def test_every_family_maps_to_formats_on_their_own_runtime():
    for family in FAMILIES.values():
        for runtime, name in family.stored.items():
            record = FORMATS[name]
            assert record.runtime in (runtime, None) or (runtime == "torch" and record.name == "mxfp4")
            assert record.grid is not None  # shrink can make it: an exact grid exists


def test_every_weight_format_has_a_gate_with_a_reason():
    for fmt in FORMATS.values():
        gate = gate_for(fmt.name)
        assert gate.reason and 0 <= gate.min_top1 <= 1 and gate.max_kl > 0


def test_weight_only_quantization_computes_in_the_activation_format():
    assert matmul_compute_class(get_format("q4_0"), get_format("bf16")) == "bf16"
    assert matmul_compute_class(get_format("fp8"), get_format("fp8")) == "fp8"


def test_every_format_has_a_known_compute_class():
    assert all(f.compute in COMPUTE_CLASSES for f in FORMATS.values())


def test_unknown_format():
    with pytest.raises(ShrinkError, match="known formats"):
        get_format("int3")


def test_wilson_interval_hand_values():
    # 361 of 374 (96.52%): p = 0.96524, z = 1.96; centre (p + z^2/2n) / (1 + z^2/n) = 0.96051,
    # half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n) = 0.01907 -> (0.9414, 0.9796):
    # a 97% bound is inside it, a 98% bound is not
    low, high = wilson_interval(361, 374)
    assert low == pytest.approx(0.9414, abs=2e-4) and high == pytest.approx(0.9796, abs=2e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_a_mixture_costs_its_parts_by_share():
    from shrink.numformats import mixture_name

    name = mixture_name({"q4_k": 2, "q6_k": 1})  # two thirds of the elements in Q4_K
    # (2 x 4.5 + 6.5625) / 3 bits, and the wider part's compute class (Q6_K computes as int8)
    assert get_format(name).bits_per_element == pytest.approx((2 * 4.5 + 6.5625) / 3, rel=1e-6)
    assert get_format(name).compute == "int8"
    assert mixture_name({"q8_0": 5}) == "q8_0"
    with pytest.raises(ShrinkError, match="not a format mixture"):
        get_format("q4_k*half+q6_k*half")
