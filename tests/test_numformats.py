"""Number formats: storage per weight agrees with the gguf package's block sizes (an independent source)."""

import pytest
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from shrink.errors import ShrinkError
from shrink.numformats import FORMATS, get_format, matmul_compute_class

GGUF_TYPES = {
    "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "q4_k": "Q4_K",
    "q5_k": "Q5_K", "q6_k": "Q6_K", "tq1_0": "TQ1_0", "tq2_0": "TQ2_0", "mxfp4": "MXFP4",
    "fp32": "F32", "fp16": "F16", "bf16": "BF16",
}


@pytest.mark.parametrize("name, ggml", sorted(GGUF_TYPES.items()))
def test_bits_per_weight_match_gguf_block_sizes(name, ggml):
    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType[ggml]]
    assert get_format(name).bits_per_element == 8 * type_size / block


def test_nvfp4_and_binary_storage():
    assert get_format("nvfp4").bits_per_element == 4.5  # E2M1 + one E4M3 scale per 16
    assert get_format("q1_0").bits_per_element == 1 + 16 / 128  # sign + fp16 scale per 128


def test_weight_only_quantization_computes_in_the_activation_format():
    assert matmul_compute_class(get_format("int4"), get_format("bf16")) == "bf16"
    assert matmul_compute_class(get_format("fp8"), get_format("fp8")) == "fp8"


def test_every_format_has_a_known_compute_class():
    from shrink.numformats import COMPUTE_CLASSES

    assert all(f.compute in COMPUTE_CLASSES for f in FORMATS.values())


def test_unknown_format():
    with pytest.raises(ShrinkError, match="known formats"):
        get_format("int3")
