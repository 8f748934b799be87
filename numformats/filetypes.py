"""llama.cpp's file types: what its own quantizer (`llama-quantize`, `llama_model_quantize`) makes.

A file type is a recipe of llama.cpp's, not a stored format: Q4_K_M puts most block weights on Q4_K,
some (attn_v, ffn_down of chosen layers) on Q6_K, the output projection on Q6_K, and every tensor
whose rows its blocks do not divide on a fallback type (Gemma 3's 640-wide rows: Q5_0 / Q8_0). What
a file really stores is read back from it (ggufmeta.gguf_formats), never assumed from the name.
`ftype` is the `llama_ftype` value of llama.h in the pinned llama-cpp-python.
"""

from __future__ import annotations

from dataclasses import dataclass

from shrink.errors import ShrinkError


@dataclass(frozen=True)
class FileType:
    name: str  # as llama-quantize spells it
    ftype: int  # llama_ftype
    weights: str  # the registry format most block weights take
    needs_imatrix: bool = False  # llama.cpp refuses these without an importance matrix


FILE_TYPES: dict[str, FileType] = {f.name: f for f in (
    FileType("F16", 1, "fp16"),
    FileType("BF16", 32, "bf16"),
    FileType("Q8_0", 7, "q8_0"),
    FileType("Q6_K", 18, "q6_k"),
    FileType("Q5_K_M", 17, "q5_k"),
    FileType("Q5_K_S", 16, "q5_k"),
    FileType("Q5_1", 9, "q5_1"),
    FileType("Q5_0", 8, "q5_0"),
    FileType("Q4_K_M", 15, "q4_k"),
    FileType("Q4_K_S", 14, "q4_k"),
    FileType("Q4_1", 3, "q4_1"),
    FileType("Q4_0", 2, "q4_0"),
    FileType("IQ4_NL", 25, "iq4_nl"),
    FileType("IQ4_XS", 30, "iq4_xs"),
    FileType("Q3_K_L", 13, "q3_k"),
    FileType("Q3_K_M", 12, "q3_k"),
    FileType("Q3_K_S", 11, "q3_k"),
    FileType("IQ3_M", 27, "iq3_s"),
    FileType("IQ3_S", 26, "iq3_s"),
    FileType("IQ3_XS", 22, "iq3_s"),
    FileType("IQ3_XXS", 23, "iq3_xxs", needs_imatrix=True),  # llama.cpp: "this quantization requires an imatrix"
    FileType("Q2_K", 10, "q2_k"),
    FileType("Q2_K_S", 21, "q2_k", needs_imatrix=True),
    FileType("IQ2_M", 29, "iq2_s"),
    FileType("IQ2_S", 28, "iq2_s", needs_imatrix=True),
    FileType("IQ2_XS", 20, "iq2_xs", needs_imatrix=True),
    FileType("IQ2_XXS", 19, "iq2_xxs", needs_imatrix=True),
    FileType("IQ1_M", 31, "iq1_m", needs_imatrix=True),
    FileType("IQ1_S", 24, "iq1_s", needs_imatrix=True),
    FileType("TQ2_0", 37, "tq2_0"),
    FileType("TQ1_0", 36, "tq1_0"),
    FileType("Q1_0", 40, "q1_0"),
)}

# What a user of llama.cpp ships and compares against: its K-quant and IQ4 mixes, Q8_0 and Q4_0.
# The lower IQ types are tried only with an importance matrix; ternary and binary lose the model
# without training (gate _LOW in the registry), so they are candidates only when asked for.
COMMON = ("Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q5_0", "Q4_K_M", "Q4_K_S", "Q4_0", "IQ4_NL", "IQ4_XS",
          "Q3_K_L", "Q3_K_M", "Q3_K_S", "IQ3_M", "IQ3_XXS", "Q2_K")


def file_type(name: str) -> FileType:
    key = name.upper()
    if key not in FILE_TYPES:
        raise ShrinkError(f"Unknown llama.cpp file type '{name}'; known: {', '.join(FILE_TYPES)}.")
    return FILE_TYPES[key]
