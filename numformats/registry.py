"""Number formats shrink knows: storage cost (scales included) and the compute class they execute in.

The roofline estimator and the memory report read only this table, so adding a format here makes it
estimable everywhere. Storage figures are exact for the block layouts named in each description.
"""

from __future__ import annotations

from dataclasses import dataclass

from shrink.errors import ShrinkError

# Compute classes a hardware profile can list a peak for, and what a class falls back to when the
# hardware lacks it (a format without native support is costed as its upcast).
COMPUTE_CLASSES = ("fp32", "tf32", "fp16", "bf16", "fp8", "int8", "int4", "fp4")
UPCAST = {
    "fp4": "fp8",
    "fp8": "fp16",
    "int4": "int8",
    "int8": "fp16",
    "bf16": "fp16",
    "fp16": "fp32",
    "tf32": "fp32",
}


@dataclass(frozen=True)
class NumberFormat:
    name: str
    bits_per_element: float  # storage, block scales and zero points included
    compute: str  # the compute class a matmul on this format runs in when both operands use it
    description: str

    @property
    def bytes_per_element(self) -> float:
        return self.bits_per_element / 8


def _fmt(name: str, bits: float, compute: str, description: str) -> NumberFormat:
    return NumberFormat(name, bits, compute, description)


FORMATS: dict[str, NumberFormat] = {
    f.name: f
    for f in (
        _fmt("fp32", 32, "fp32", "IEEE float32"),
        _fmt("fp16", 16, "fp16", "IEEE float16"),
        _fmt("bf16", 16, "bf16", "bfloat16"),
        _fmt("fp8", 8, "fp8", "FP8 E4M3 with one fp32 scale per tensor"),
        _fmt("fp8_e5m2", 8, "fp8", "FP8 E5M2 with one fp32 scale per tensor"),
        _fmt("int8", 8, "int8", "INT8 per output channel; the per-row scale is negligible storage"),
        _fmt("int4", 4 + 16 / 128, "int4", "INT4 symmetric, one fp16 scale per group of 128"),
        _fmt("int4_g32", 4 + 16 / 32, "int4", "INT4 symmetric, one fp16 scale per group of 32"),
        _fmt("nvfp4", 4 + 8 / 16, "fp4", "NVFP4: E2M1 in blocks of 16, FP8 E4M3 block scale, fp32 tensor scale"),
        _fmt("mxfp4", 4 + 8 / 32, "fp4", "MXFP4: E2M1 in blocks of 32 with an E8M0 scale"),
        _fmt("q8_0", 34 * 8 / 32, "int8", "GGUF Q8_0: 32 int8 + fp16 scale (34 bytes per 32)"),
        _fmt("q4_0", 18 * 8 / 32, "int4", "GGUF Q4_0: 32 4-bit + fp16 scale (18 bytes per 32)"),
        _fmt("q4_1", 20 * 8 / 32, "int4", "GGUF Q4_1: 32 4-bit + fp16 scale and min (20 bytes per 32)"),
        _fmt("q5_0", 22 * 8 / 32, "int8", "GGUF Q5_0: 32 5-bit + fp16 scale (22 bytes per 32)"),
        _fmt("q5_1", 24 * 8 / 32, "int8", "GGUF Q5_1: 32 5-bit + fp16 scale and min (24 bytes per 32)"),
        _fmt("q4_k", 144 * 8 / 256, "int4", "GGUF Q4_K: super-blocks of 256, 144 bytes"),
        _fmt("q5_k", 176 * 8 / 256, "int8", "GGUF Q5_K: super-blocks of 256, 176 bytes"),
        _fmt("q6_k", 210 * 8 / 256, "int8", "GGUF Q6_K: super-blocks of 256, 210 bytes"),
        _fmt("tq2_0", 66 * 8 / 256, "int8", "GGUF TQ2_0 ternary: 2 bits per weight + fp16 scale per 256"),
        _fmt("tq1_0", 54 * 8 / 256, "int8", "GGUF TQ1_0 ternary: 1.6875 bits per weight"),
        _fmt("ternary", 2 + 16 / 256, "int8", "ternary {-1,0,1} packed 2 bits, fp16 scale per 256"),
        _fmt("binary", 1 + 16 / 128, "int8", "binary sign, fp16 scale per 128 (GGUF Q1_0)"),
    )
}

ALIASES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "fp8_e4m3": "fp8", "q1_0": "binary"}


def get_format(name: str) -> NumberFormat:
    key = ALIASES.get(name.lower(), name.lower())
    if key not in FORMATS:
        known = ", ".join(FORMATS)
        raise ShrinkError(f"Unknown number format '{name}'; known formats: {known}.")
    return FORMATS[key]


def matmul_compute_class(weights: NumberFormat, activations: NumberFormat) -> str:
    """The class a weight x activation matmul runs in: the wider of the two operands.

    Weight-only quantization (int4 weights, bf16 activations) dequantizes into the activation
    format, so it computes at bf16 speed and saves only memory traffic.
    """
    order = ["fp4", "int4", "fp8", "int8", "bf16", "fp16", "tf32", "fp32"]
    return max(weights.compute, activations.compute, key=order.index)
