"""GGUF block bytes from a QTensor: its own codes and scales, laid out as llama.cpp reads them.

Nothing is re-rounded: every scale a packable format holds is already the fp16 / E8M0 / UE4M3 value
the block stores, so gguf's dequantizer gives back exactly `dequantize(q)`. Layouts per block:
Q8_0 fp16 d + 32 int8; Q4_0 fp16 d + 16 bytes (element j low nibble, j + 16 high); Q4_1 fp16 d,
fp16 m + the same nibbles; MXFP4 one E8M0 byte + the same nibbles; NVFP4 per 64: four UE4M3 scale
bytes + 4 x 8 bytes (element j low, j + 8 high, per 16); TQ2_0 per 256: 64 bytes of 2-bit codes + 1
(element 128c + 32l + m in bits 2l of byte 32c + m) + fp16 d; TQ1_0 per 256: 48 + 4 bytes of base-3
digits scaled to a byte + fp16 d; Q1_0 per 128: fp16 d + 16 bytes of sign bits (bit j % 8 of byte
j // 8 set for +d); Q5_0 / Q5_1: fp16 d (and m) + 4 bytes of fifth bits (bit j for element j) + the
same nibbles. K-quants per 256 (ggml-common.h): Q4_K fp16 d, fp16 dmin, 12 bytes of 6-bit scales and
mins, 128 bytes of nibbles (element 64c + l low, 64c + 32 + l high, in byte 32c + l); Q5_K the same
with 32 bytes of fifth bits between (bits 2c and 2c + 1 of byte l); Q6_K 128 bytes of low nibbles,
64 of 2-bit high parts, 16 int8 scales, fp16 d.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType

from shrink.numformats.grids import UE4M3_VALUES, QTensor
from shrink.numformats.registry import FORMATS
from shrink.errors import ShrinkError

# grid -> the GGUF types it can be written as (the first is the default), from the registry's records
PACKABLE: dict[str, tuple[str, ...]] = {}
for _record in FORMATS.values():
    if _record.grid and _record.gguf_type:
        PACKABLE[_record.grid] = (*PACKABLE.get(_record.grid, ()), _record.gguf_type)


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.reshape(-1, 1).astype(np.float16).view(np.uint8)


def _nibbles(codes: np.ndarray) -> np.ndarray:
    """[n, 2k] 4-bit codes -> [n, k] bytes: element j in the low nibble, element j + k in the high."""
    half = codes.shape[1] // 2
    return (codes[:, :half] | (codes[:, half:] << 4)).astype(np.uint8)


def _ue4m3_bytes(scales: np.ndarray) -> np.ndarray:
    table = np.array(UE4M3_VALUES[:0x7F], dtype=np.float32)  # bytes 0..0x7E, increasing
    index = np.searchsorted(table, scales).clip(0, 0x7E)
    if not np.array_equal(table[index], scales):
        raise ShrinkError("An nvfp4_gguf block scale is not an unsigned E4M3 value; quantize the weight again.")
    return index.astype(np.uint8)


def _base3(digits: np.ndarray, width: int) -> np.ndarray:
    """[n, k * width] digits 0..2 -> [n, width]: byte m holds digits m, m + width, ... most significant
    first, then scaled from 0..242 to a byte rounding up (so that llama.cpp reads a digit with *3 >> 8)."""
    groups = digits.reshape(digits.shape[0], -1, width).astype(np.uint16)
    powers = 3 ** np.arange(4, 4 - groups.shape[1], -1, dtype=np.uint16)
    value = (groups * powers[None, :, None]).sum(axis=1)
    return ((value * 256 + 242) // 243).astype(np.uint8)


def _fifth_bits(codes: np.ndarray) -> np.ndarray:
    """[n, 32] 5-bit codes -> [n, 4] bytes: bit j of the little-endian uint32 is bit 4 of element j."""
    return np.packbits((codes >> 4) & 1, axis=1, bitorder="little")


def _k_scales(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    """[n, 8] 6-bit scales and mins -> [n, 12] bytes, as quantize_row_q4_K_ref packs them."""
    low, high = slice(0, 4), slice(4, 8)
    return np.concatenate([sc[:, low] | ((sc[:, high] >> 4) << 6), m[:, low] | ((m[:, high] >> 4) << 6),
                           (sc[:, high] & 0xF) | ((m[:, high] & 0xF) << 4)], axis=1).astype(np.uint8)


def _sub_scales(q: QTensor) -> tuple[np.ndarray, ...]:
    """A K-quant's fp16 d (and dmin) per super-block and its integer scales (and mins) per group."""
    supers = q.super_scales.cpu().numpy().reshape(-1, q.super_scales.shape[-1])
    per = q.scales.cpu().numpy().reshape(supers.shape[0], -1)
    d = supers[:, :1]
    with np.errstate(divide="ignore", invalid="ignore"):  # d*sc is exact in float32: the division is too
        sc = np.where(d == 0, 0, per / d)
        if q.zeros is None:
            return d, sc.astype(np.int8)
        dmin = supers[:, 1:]
        m = np.where(dmin == 0, 0, -q.zeros.cpu().numpy().reshape(per.shape) / dmin)
    return d, dmin, sc.astype(np.uint8), m.astype(np.uint8)


def _kquant_body(kind: str, q: QTensor, codes: np.ndarray) -> list[np.ndarray]:
    blocks = codes.reshape(-1, 256).astype(np.int16)
    if kind == "Q6_K":
        d, sc = _sub_scales(q)
        L = (blocks + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # halves of 128, quarters of 32
        low, high = L & 0xF, L >> 4
        ql = np.concatenate([low[:, :, 0] | (low[:, :, 2] << 4), low[:, :, 1] | (low[:, :, 3] << 4)], axis=2)
        qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
        return [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), _fp16_bytes(d)]
    d, dmin, sc, m = _sub_scales(q)
    L = blocks.astype(np.uint8).reshape(-1, 4, 2, 32)  # chunks of 64: low 32 | high 32
    nibbles = ((L[:, :, 0] & 0xF) | ((L[:, :, 1] & 0xF) << 4)).reshape(-1, 128)
    head = [_fp16_bytes(d), _fp16_bytes(dmin), _k_scales(sc, m)]
    if kind == "Q4_K":
        return [*head, nibbles]
    fifth = (L >> 4).astype(np.uint8)  # bit 2c: element 64c + l, bit 2c + 1: 64c + 32 + l
    qh = sum(fifth[:, c, h] << (2 * c + h) for c in range(4) for h in range(2)).astype(np.uint8)
    return [*head, qh, nibbles]


def pack(q: QTensor, ggml_type: GGMLQuantizationType | str | None = None) -> tuple[np.ndarray, GGMLQuantizationType]:
    """(uint8 [rows, bytes per row] as gguf.quants.quantize returns, the GGMLQuantizationType); an f16
    weight gives its float16 [rows, cols]."""
    if q.format not in PACKABLE:
        raise ShrinkError(f"Only {', '.join(PACKABLE)} weights pack into GGUF blocks, not {q.format}.")
    kind = PACKABLE[q.format][0] if ggml_type is None else getattr(ggml_type, "name", str(ggml_type)).upper()
    if kind not in PACKABLE[q.format]:
        raise ShrinkError(f"A {q.format} weight packs as {' or '.join(PACKABLE[q.format])}, not {kind}.")
    rows = q.shape[0]
    if kind == "F16":
        return np.ascontiguousarray(q.codes.cpu().numpy().view(np.float16)), GGMLQuantizationType.F16
    codes = q.codes.cpu().numpy()
    scales = q.scales.cpu().numpy().reshape(-1)
    blocks = codes.reshape(scales.size, -1)  # one scale per block
    if kind == "Q8_0":
        body = [_fp16_bytes(scales), blocks.astype(np.int8).view(np.uint8)]
    elif kind == "Q4_0":
        body = [_fp16_bytes(scales), _nibbles((blocks + 8).astype(np.uint8))]
    elif kind == "Q4_1":
        body = [_fp16_bytes(scales), _fp16_bytes(q.zeros.cpu().numpy()), _nibbles(blocks.astype(np.uint8))]
    elif kind in ("Q5_0", "Q5_1"):
        q5 = (blocks + (16 if kind == "Q5_0" else 0)).astype(np.uint8)
        head = [_fp16_bytes(scales)] + ([_fp16_bytes(q.zeros.cpu().numpy())] if kind == "Q5_1" else [])
        body = [*head, _fifth_bits(q5), _nibbles(q5 & 0xF)]
    elif kind in ("Q4_K", "Q5_K", "Q6_K"):
        body = _kquant_body(kind, q, codes)
    elif kind == "MXFP4":
        mantissa, exponent = np.frexp(scales)  # scale = 2^(e - 127) = 0.5 * 2^(e - 126)
        assert np.all(mantissa == 0.5), "MXFP4 scales are powers of two"
        body = [(exponent + 126).astype(np.uint8).reshape(-1, 1), _nibbles(blocks.astype(np.uint8))]
    elif kind == "NVFP4":
        subblocks = blocks.astype(np.uint8).reshape(-1, 4, 2, 8)  # per 64: 4 x 16, each low 8 | high 8
        body = [_ue4m3_bytes(scales).reshape(-1, 4),
                (subblocks[:, :, 0] | (subblocks[:, :, 1] << 4)).reshape(-1, 32)]
    elif kind == "TQ2_0":
        digits = (blocks + 1).astype(np.uint8).reshape(-1, 2, 4, 32)
        shifted = digits << np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
        body = [np.bitwise_or.reduce(shifted, axis=2).reshape(-1, 64), _fp16_bytes(scales)]
    elif kind == "TQ1_0":
        digits = (blocks + 1).astype(np.uint8)
        body = [_base3(digits[:, :160], 32), _base3(digits[:, 160:240], 16), _base3(digits[:, 240:], 4),
                _fp16_bytes(scales)]
    else:  # Q1_0
        body = [_fp16_bytes(scales), np.packbits(blocks > 0, axis=1, bitorder="little")]
    packed = np.concatenate(body, axis=1).reshape(rows, -1)
    return np.ascontiguousarray(packed), GGMLQuantizationType[kind]
