"""Weight grids with exact numerics: quantize to codes and scales, dequantize, effective bits.

Blocks run along a weight's rows (the input dimension), as GGUF stores them. The GGUF grids (q8_0,
q4_0, q4_1, mxfp4) repeat the gguf package's float32 arithmetic step by step in numpy, so that the
codes and scales are the ones llama.cpp's converter would write; nvfp4_gguf, ternary_b256 and
binary_b128 are the layouts of GGUF's NVFP4, TQ1_0/TQ2_0 and Q1_0 with scales chosen here (absmax
for NVFP4, absmean for the ternary and binary ones). The others follow their references: NVFP4 as
Model-Optimizer (E2M1, E4M3 block scale, fp32 tensor scale), FP8 through torch's float8 dtypes,
BitNet b1.58 absmean ternary, FBI-LLM sign with a per-channel scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from shrink.errors import ShrinkError

E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
KVALUES_DOUBLED = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # GGUF's E2M1 table, x2
FP8_MAX = {"e4m3": 448.0, "e5m2": 57344.0}


@dataclass(frozen=True)
class Grid:
    name: str
    block: int  # elements per scale along a row; 0: one scale per row; -1: one per tensor
    bits: float  # storage bits per weight, scales included (per-row / per-tensor scales added per shape)
    description: str


GRIDS: dict[str, Grid] = {g.name: g for g in (
    Grid("f16", 1, 16.0, "IEEE half precision, no scale: the last fallback for rows no block divides"),
    Grid("q8_0", 32, 8.5, "GGUF Q8_0: int8 codes, fp16 absmax scale per 32"),
    Grid("q4_0", 32, 4.5, "GGUF Q4_0: 4-bit codes -8..7, fp16 scale (signed max / -8) per 32"),
    Grid("q4_1", 32, 5.0, "GGUF Q4_1: 4-bit codes 0..15, fp16 scale and minimum per 32"),
    Grid("mxfp4", 32, 4.25, "MXFP4: E2M1 values, power-of-two (E8M0) scale per 32, as GGUF's converter"),
    Grid("nvfp4", 16, 4.5, "NVFP4: E2M1 values, FP8 E4M3 scale per 16, fp32 scale per tensor"),
    Grid("nvfp4_gguf", 16, 4.5, "GGUF NVFP4: E2M1 values, unsigned E4M3 scale per 16, no tensor scale"),
    Grid("fp8_e4m3", -1, 8.0, "FP8 E4M3, one fp32 scale per tensor"),
    Grid("fp8_e5m2", -1, 8.0, "FP8 E5M2, one fp32 scale per tensor"),
    Grid("fp8_e4m3_channel", 0, 8.0, "FP8 E4M3, one fp32 scale per output row"),
    Grid("fp8_e5m2_channel", 0, 8.0, "FP8 E5M2, one fp32 scale per output row"),
    Grid("int8", 0, 8.0, "INT8 symmetric, codes -127..127, fp32 absmax scale per output row"),
    Grid("int8_g32", 32, 9.0, "INT8 symmetric per 32, fp32 scale = signed max / -128 (ONNX Runtime's MatMulNBits rule)"),
    *(Grid(f"int4_g{n}", n, 4 + 16 / n, f"INT4 symmetric per {n} (the Q4_0 rule), fp16 scale") for n in (32, 64, 128)),
    *(Grid(f"int4_g{n}_asym", n, 4 + 32 / n, f"INT4 asymmetric per {n} (the Q4_1 rule), fp16 scale and minimum")
      for n in (32, 64, 128)),
    Grid("ternary", -1, 1.6875, "BitNet b1.58: codes -1/0/1, absmean scale per tensor"),
    Grid("ternary_b256", 256, 2.0625, "Ternary codes, fp16 absmean scale per 256 (GGUF TQ2_0; 1.6875 bits as TQ1_0)"),
    Grid("binary", 0, 1.0, "FBI-LLM: sign codes, mean |w| scale per output row"),
    Grid("binary_b128", 128, 1.125, "Sign codes, fp16 mean |w| scale per 128 (GGUF Q1_0)"),
)}


@dataclass
class QTensor:
    format: str
    shape: tuple[int, ...]
    codes: Any  # torch int tensor, the weight's shape: the grid index of every element
    scales: Any  # torch float32: per block [rows, blocks], per row [rows, 1] or per tensor [1, 1]
    zeros: Any = None  # q4_1-style minimum per block
    tensor_scale: float | None = None  # NVFP4's second-level scale


def grid(name: str) -> Grid:
    if name not in GRIDS:
        raise ShrinkError(f"Unknown weight grid '{name}'; known grids: {', '.join(GRIDS)}.")
    return GRIDS[name]


def block_size(name: str) -> int:
    """What a row's length must be a multiple of."""
    block = grid(name).block
    return {"nvfp4_gguf": 64}.get(name, block if block > 0 else 1)


def scale_group_size(name: str, shape: tuple[int, ...]) -> int:
    """Elements that share one scale (for clipping searches)."""
    block = grid(name).block
    return block if block > 0 else shape[-1] if block == 0 else int(np.prod(shape))


def effective_bits(name: str, shape: tuple[int, ...]) -> float:
    g = grid(name)
    numel = int(np.prod(shape))
    extra = {0: 32 / shape[-1], -1: 32 / numel}.get(g.block, 0.0)
    return g.bits + extra + (32 / numel if name == "nvfp4" else 0.0)


def _blocks(weight: np.ndarray, block: int, name: str) -> np.ndarray:
    rows, cols = weight.shape
    if cols % block:
        raise ShrinkError(f"Rows of {cols} are not a multiple of {name}'s {block}-element blocks.")
    return weight.reshape(rows, cols // block, block)


def _np_roundf(x: np.ndarray) -> np.ndarray:
    # C roundf (half away from zero), as gguf writes it
    a = np.abs(x)
    floored = np.floor(a)
    return np.sign(x) * (floored + np.floor(2 * (a - floored)))


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def _to_numpy(weight: Any) -> np.ndarray:
    if weight.dim() != 2:
        raise ShrinkError(f"Weight grids take 2-D weights, got shape {tuple(weight.shape)}.")
    return weight.detach().to("cpu").float().numpy()


def _q8_0(b: np.ndarray) -> tuple:
    d = np.abs(b).max(axis=-1, keepdims=True) / np.float32(127)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
    return _np_roundf(b * inv).astype(np.int8), _fp16(d), None


def _q4_0(b: np.ndarray) -> tuple:
    index = np.abs(b).argmax(axis=-1)[..., None]
    d = np.take_along_axis(b, index, axis=-1) / np.float32(-8)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
    codes = np.trunc(b * inv + np.float32(8.5)).astype(np.float32).clip(0, 15).astype(np.int8) - 8
    return codes, _fp16(d), None


def _q4_1(b: np.ndarray) -> tuple:
    top, low = b.max(axis=-1, keepdims=True), b.min(axis=-1, keepdims=True)
    d = (top - low) / np.float32(15)
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, 0, 1 / d).astype(np.float32)
    codes = np.trunc((b - low) * inv + np.float32(0.5)).astype(np.float32).clip(0, 15).astype(np.int8)
    return codes, _fp16(d), _fp16(low)


def _int8_g32(b: np.ndarray) -> tuple:
    index = np.abs(b).argmax(axis=-1)[..., None]
    d = np.take_along_axis(b, index, axis=-1) / np.float32(-128)
    safe = np.where(d == 0, 1, d).astype(np.float32)
    return np.clip(np.rint(b / safe), -128, 127).astype(np.int16) * (d != 0), d.astype(np.float32), None


def _nearest(b: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Index into KVALUES_DOUBLED of the value nearest to each element (first index on ties: the
    positive code and the smaller magnitude, as gguf's argmin)."""
    values = scale[..., None] * np.array(KVALUES_DOUBLED, dtype=np.float32)
    return np.abs(values - b[..., None]).argmin(axis=-1).astype(np.int8)


def _mxfp4(b: np.ndarray) -> tuple:
    amax = np.abs(b).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        e = np.where(amax > 0, np.floor(np.log2(amax)) - 2 + 127, 0).astype(np.int32)
    scale = np.ldexp(np.float32(1), e - 128).astype(np.float32)  # E8M0 halved: values are doubled kvalues
    return _nearest(b, scale), scale, None


def _nvfp4_gguf(b: np.ndarray) -> tuple:
    """The block scale is the largest unsigned E4M3 value not above amax / 6 (rounded down, not to
    nearest): the block's largest element then always takes the code 6, so quantizing on-grid
    values gives back the same scale, which is what lets an export read a trained student exactly."""
    from gguf.quants import NVFP4

    target = np.abs(b).max(axis=-1, keepdims=True) / np.float32(6)
    stored = NVFP4.fp32_to_ue4m3(target).astype(np.int16)
    too_big = NVFP4.ue4m3_to_fp32(stored.astype(np.uint8)) * 2 > target
    stored = np.where(too_big & (stored > 0), stored - 1, stored).astype(np.uint8)
    scale = NVFP4.ue4m3_to_fp32(stored).astype(np.float32)  # halved: the table holds doubled values
    return _nearest(b, scale), scale, None


def _e4m3(x: np.ndarray) -> np.ndarray:
    import torch

    return torch.from_numpy(np.ascontiguousarray(x)).to(torch.float8_e4m3fn).float().numpy()


def _nvfp4(b: np.ndarray) -> tuple:
    amax = np.abs(b).max()
    tensor_scale = np.float32(amax / np.float32(6 * 448)) if amax > 0 else np.float32(1)
    block_scale = _e4m3(np.abs(b).max(axis=-1, keepdims=True) / np.float32(6) / tensor_scale)
    scale = (block_scale * tensor_scale * np.float32(0.5)).astype(np.float32)  # halved: doubled kvalues
    return _nearest(b, scale), scale, None, float(tensor_scale)


def _fp8(w: np.ndarray, kind: str, per_row: bool) -> tuple:
    import torch

    amax = np.abs(w).max(axis=-1, keepdims=True) if per_row else np.abs(w).max().reshape(1, 1)
    scale = np.where(amax > 0, amax / np.float32(FP8_MAX[kind]), 1).astype(np.float32)
    dtype = torch.float8_e4m3fn if kind == "e4m3" else torch.float8_e5m2
    codes = torch.from_numpy(np.ascontiguousarray(w / scale)).to(dtype).view(torch.uint8).numpy()
    return codes, scale


def _int8(w: np.ndarray) -> tuple:
    scale = np.abs(w).max(axis=-1, keepdims=True) / np.float32(127)
    safe = np.where(scale == 0, 1, scale).astype(np.float32)
    return np.clip(np.rint(w / safe), -127, 127).astype(np.int8), scale.astype(np.float32)


def _absmean_codes(x: np.ndarray, scale: np.ndarray, limit: int) -> np.ndarray:
    safe = np.where(scale == 0, 1, scale).astype(np.float32)
    return np.clip(np.rint(x / safe), -limit, limit).astype(np.int8) * (scale != 0)


def _sign(x: np.ndarray) -> np.ndarray:
    return np.where(x >= 0, 1, -1).astype(np.int8)


BLOCK_QUANTIZERS = {"q8_0": _q8_0, "int8_g32": _int8_g32, "q4_0": _q4_0, "q4_1": _q4_1, "mxfp4": _mxfp4, "nvfp4_gguf": _nvfp4_gguf,
                    **{f"int4_g{n}": _q4_0 for n in (32, 64, 128)},
                    **{f"int4_g{n}_asym": _q4_1 for n in (32, 64, 128)}}
LOOKUP_GRIDS = ("mxfp4", "nvfp4_gguf", "nvfp4")  # codes index KVALUES_DOUBLED


def quantize(weight: Any, name: str) -> QTensor:
    """Codes and scales of a 2-D weight on grid `name`."""
    import torch

    g = grid(name)
    w = _to_numpy(weight)
    shape = tuple(w.shape)
    zeros, tensor_scale = None, None
    if name == "f16":
        codes, scales = w.astype(np.float16).view(np.int16), np.ones((1, 1), dtype=np.float32)
    elif name in BLOCK_QUANTIZERS or name == "nvfp4":
        blocks = _blocks(w, g.block, name)
        if name == "nvfp4":
            codes, scales, zeros, tensor_scale = _nvfp4(blocks)
        else:
            codes, scales, zeros = BLOCK_QUANTIZERS[name](blocks)
    elif name.startswith("fp8"):
        codes, scales = _fp8(w, name[4:8], name.endswith("channel"))
    elif name == "int8":
        codes, scales = _int8(w)
    elif name == "ternary":
        scales = np.abs(w).mean(dtype=np.float32).reshape(1, 1).astype(np.float32)
        codes = _absmean_codes(w, scales, 1)
    elif name == "ternary_b256":
        blocks = _blocks(w, 256, name)
        scales = _fp16(np.abs(blocks).mean(axis=-1, keepdims=True, dtype=np.float32))
        codes = _absmean_codes(blocks, scales, 1)
    elif name == "binary":
        scales = np.abs(w).mean(axis=-1, keepdims=True, dtype=np.float32)
        codes = _sign(w)
    else:  # binary_b128
        blocks = _blocks(w, 128, name)
        scales = _fp16(np.abs(blocks).mean(axis=-1, keepdims=True, dtype=np.float32))
        codes = _sign(blocks)

    def tensor(x):
        return None if x is None else torch.from_numpy(np.ascontiguousarray(x))

    scales = np.asarray(scales, dtype=np.float32)
    return QTensor(name, shape, tensor(np.asarray(codes).reshape(shape)),
                   tensor(scales.reshape(1, 1) if scales.size == 1 else scales.reshape(shape[0], -1)),
                   tensor(None if zeros is None else zeros.reshape(shape[0], -1)), tensor_scale)


def dequantize(q: QTensor) -> Any:
    import torch

    rows = q.shape[0] if q.scales.numel() > 1 else 1  # one scale per tensor broadcasts over all rows
    codes = q.codes.reshape(rows, q.scales.shape[1], -1)
    scales = q.scales.reshape(rows, -1, 1)
    if q.format == "f16":
        return q.codes.view(torch.float16).float()
    if q.format in LOOKUP_GRIDS:
        values = torch.tensor(KVALUES_DOUBLED, dtype=torch.float32)[codes.long()]
    elif q.format.startswith("fp8"):
        dtype = torch.float8_e4m3fn if "e4m3" in q.format else torch.float8_e5m2
        values = codes.view(dtype).float()
    else:
        values = codes.float()
    out = values * scales
    if q.zeros is not None:
        out = out + q.zeros.reshape(rows, -1, 1)
    return out.reshape(q.shape)


def quantize_dequantize(weight: Any, name: str) -> Any:
    """The weight as its grid represents it (float32, same shape, same device as given)."""
    return dequantize(quantize(weight, name)).to(weight.device)


def saturation_limit(name: str) -> float | None:
    """|weight / scale| beyond which the grid clips (None: absmax scales clip nothing)."""
    return 1.5 if name.startswith(("ternary", "binary")) else None


def from_grid_values(weight: Any, name: str) -> QTensor:
    """Codes and scales of a weight already on grid `name` (a trained student's weight). The
    absmean grids are not idempotent (the mean of |codes x scale| is not the scale), so their
    scale is read back as each group's absolute maximum, which on-grid values carry exactly."""
    import torch

    if name not in ("ternary", "ternary_b256", "binary", "binary_b128"):
        return quantize(weight, name)
    w = _to_numpy(weight)
    shape = w.shape
    if name in ("ternary_b256", "binary_b128"):
        groups = _blocks(w, grid(name).block, name)
        scales = np.abs(groups).max(axis=-1, keepdims=True)
    elif name == "ternary":
        groups, scales = w, np.abs(w).max().reshape(1, 1)
    else:
        groups, scales = w, np.abs(w).max(axis=-1, keepdims=True)
    safe = np.where(scales == 0, 1, scales).astype(np.float32)
    codes = np.rint(groups / safe).astype(np.int8)
    if name.startswith("binary"):
        codes = np.where(codes >= 0, 1, -1).astype(np.int8)
    scales = scales.astype(np.float32)
    return QTensor(name, tuple(shape), torch.from_numpy(np.ascontiguousarray(codes.reshape(shape))),
                   torch.from_numpy(scales.reshape(1, 1) if scales.size == 1 else scales.reshape(shape[0], -1)))
