"""GGUF block bytes from a QTensor: the student's own codes and scales, never re-rounded.

Layouts (per block, as llama.cpp reads them): Q8_0 fp16 d + 32 int8; Q4_0 fp16 d + 16 bytes of
nibbles (element j low, j+16 high); Q4_1 fp16 d, fp16 m + nibbles; MXFP4 one E8M0 byte + nibbles;
NVFP4 per 64: four unsigned-E4M3 scale bytes + 4 x 8 bytes (elements 0-7 low, 8-15 high of each
16); TQ2_0/TQ1_0 per 256: 2-bit / base-3 codes then fp16 d; Q1_0 per 128: fp16 d + 16 bytes of sign
bits (element j in bit j % 8 of byte j // 8, set for +d).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from shrink.compress.quant.formats import QTensor
from shrink.errors import ShrinkError

PACKABLE = {"f16": "F16", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1", "int4_g32": "Q4_0", "int4_g32_asym": "Q4_1",
            "mxfp4": "MXFP4", "nvfp4_gguf": "NVFP4", "ternary_b256": "TQ2_0", "binary_b128": "Q1_0"}


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).view(np.uint8).reshape(x.shape[0], 2)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[blocks, 2k] 4-bit values -> [blocks, k] bytes: element j low nibble, element j + k high."""
    half = codes.shape[1] // 2
    return (codes[:, :half] | (codes[:, half:] << 4)).astype(np.uint8)


def pack(q: QTensor, ggml_type: str | None = None) -> tuple[np.ndarray, Any]:
    """(bytes shaped [rows, bytes per row], the gguf GGMLQuantizationType)."""
    from gguf import GGMLQuantizationType

    if q.format not in PACKABLE:
        raise ShrinkError(f"The {q.format} grid has no GGUF layout; packable grids: {', '.join(PACKABLE)}.")
    kind = ggml_type or PACKABLE[q.format]
    if kind == "F16":
        return q.codes.numpy().view(np.float16), GGMLQuantizationType.F16
    rows = q.shape[0]
    codes = q.codes.numpy()
    n_scales = q.scales.shape[1]
    blocks = codes.reshape(rows * n_scales, -1)
    scales = q.scales.numpy().reshape(-1)
    if kind == "Q8_0":
        body = np.concatenate([_fp16_bytes(scales), blocks.astype(np.int8).view(np.uint8)], axis=1)
    elif kind == "Q4_0":
        body = np.concatenate([_fp16_bytes(scales), _nibbles((blocks + 8).astype(np.uint8))], axis=1)
    elif kind == "Q4_1":
        body = np.concatenate([_fp16_bytes(scales), _fp16_bytes(q.zeros.numpy().reshape(-1)),
                               _nibbles(blocks.astype(np.uint8))], axis=1)
    elif kind == "MXFP4":
        exponents = (np.log2(scales.astype(np.float64)) + 128).round().astype(np.uint8).reshape(-1, 1)
        body = np.concatenate([exponents, _nibbles(blocks.astype(np.uint8))], axis=1)
    elif kind == "NVFP4":
        body = _nvfp4(blocks.astype(np.uint8), scales)
    elif kind in ("TQ2_0", "TQ1_0"):
        body = _ternary(blocks, scales, kind)
    elif kind == "Q1_0":
        bits = np.packbits((blocks > 0).astype(np.uint8), axis=1, bitorder="little")
        body = np.concatenate([_fp16_bytes(scales), bits], axis=1)
    else:
        raise ShrinkError(f"No packer for GGUF type {kind}.")
    return np.ascontiguousarray(body.reshape(rows, -1)), GGMLQuantizationType[kind]


def _nvfp4(codes: np.ndarray, scales: np.ndarray) -> np.ndarray:
    from gguf.quants import NVFP4

    scale_bytes = NVFP4.fp32_to_ue4m3(scales * np.float32(2)).reshape(-1, 4)  # stored scale = 2 x the halved one
    quads = codes.reshape(-1, 4, 16)
    packed = (quads[..., :8] | (quads[..., 8:] << 4)).astype(np.uint8).reshape(-1, 32)
    return np.concatenate([scale_bytes, packed], axis=1)


def _ternary(codes: np.ndarray, scales: np.ndarray, kind: str) -> np.ndarray:
    """gguf's own TQ packer run on the codes (its absmax of a code block is 1, so it keeps them),
    with the fp16 scale it wrote (the last two bytes of a block) replaced by ours."""
    import gguf

    packed = gguf.quants.quantize(codes.astype(np.float32), getattr(gguf.GGMLQuantizationType, kind)).copy()
    packed[:, -2:] = _fp16_bytes(scales)
    return packed
