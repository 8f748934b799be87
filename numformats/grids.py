"""Weight formats with exact numerics: quantize a 2-D weight to codes and scales, dequantize them.

Blocks run along a weight's rows (the input dimension), as GGUF stores them. Each format follows
one reference, step by step in float32, so that the values are the reference's to the bit:
- q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4: gguf's quantizers (gguf/quants.py, itself ggml-quants.c);
- q4_k, q5_k, q6_k: llama.cpp's quantize_row_q*_K_ref (`shrink.numformats.kquants`), settled to a
  fixed point of itself so that a trained student's grid is found again at export;
- nvfp4_gguf: llama.cpp's quantize_row_nvfp4_ref (GGUF NVFP4: UE4M3 scale per 16, no tensor scale);
- nvfp4: NVIDIA Model-Optimizer's NVFP4QTensor (E4M3 scale per 16 and an fp32 tensor scale);
- fp8_*: torch's float8 casts; int8/int4: round half to even, as ONNX QuantizeLinear and torch;
- ternary: BitNet b1.58 absmean; binary: FBI-LLM sign and mean |w|; their _b256/_b128 variants
  hold the scale in fp16 per block, the layouts of GGUF TQ1_0/TQ2_0 and Q1_0;
- int8_g32: ONNX MatMulNBits' symmetric 8-bit blocks; f16: a plain cast, the last fallback.
Re-quantizing an output returns it unchanged for every format but nvfp4 and the K-quants (see
`IDEMPOTENT`; `from_grid_values` finds a K-quant's scales again).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from shrink.errors import ShrinkError
from shrink.numformats import kquants

ROW, TENSOR = 0, -1  # `block` of a format with one scale per output row / per tensor

# FP4 E2M1 by 4-bit code (bit 3 the sign); code 8 decodes to +0 as in Model-Optimizer and GGUF
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
# unsigned E4M3 by byte (4 exponent bits, bias 7, 3 mantissa bits), as ggml_ue4m3_to_fp32 without
# its 0.5 factor; 0x7F (NaN in E4M3FN) decodes to 0 there too
UE4M3_VALUES = tuple(
    0.0 if b in (0, 0x7F) else (b & 7) * 2.0**-9 if b < 8 else (1 + (b & 7) / 8) * 2.0 ** ((b >> 3) - 7)
    for b in range(128))


@dataclass(frozen=True)
class WeightFormat:
    description: str
    block: int  # elements per scale along a row, or ROW / TENSOR
    element_bits: float
    group_bits: int  # bits of the scale (and zero) each group stores
    lo: float  # STE range in units of the scale (x / scale, or (x - zero) / scale): the values that
    hi: float  # round onto the grid; beyond it the grid clips and the gradient is zero
    tensor_bits: int = 0  # a per-tensor extra: NVFP4's fp32 tensor scale
    divides: int = 0  # what a row's length must be a multiple of, when not `block` (GGUF NVFP4: 64)


def _int4(n: int, asym: bool) -> WeightFormat:
    if asym:
        return WeightFormat(f"INT4 asymmetric per {n}: codes 0..15, fp16 scale (max-min)/15 and fp16 min",
                            n, 4, 32, -0.5, 15.5)
    return WeightFormat(f"INT4 symmetric per {n}: codes -8..7, fp16 signed scale max/-8 (the Q4_0 rule)",
                        n, 4, 16, -8.5, 7.5)


FORMATS: dict[str, WeightFormat] = {
    "nvfp4": WeightFormat("NVFP4 (Model-Optimizer): E2M1, E4M3 scale per 16, fp32 scale per tensor",
                          16, 4, 8, -7, 7, tensor_bits=32),
    "nvfp4_gguf": WeightFormat("GGUF NVFP4 (llama.cpp): E2M1, unsigned E4M3 scale per 16, no tensor scale",
                               16, 4, 8, -7, 7, divides=64),
    "mxfp4": WeightFormat("MXFP4 (GGUF): E2M1, power-of-two E8M0 scale per 32", 32, 4, 8, -7, 7),
    "fp8_e4m3": WeightFormat("FP8 E4M3, fp32 scale amax/448 per tensor", TENSOR, 8, 32, -464, 464),
    "fp8_e5m2": WeightFormat("FP8 E5M2, fp32 scale amax/57344 per tensor", TENSOR, 8, 32, -61440, 61440),
    "fp8_e4m3_channel": WeightFormat("FP8 E4M3, fp32 scale amax/448 per output row", ROW, 8, 32, -464, 464),
    "fp8_e5m2_channel": WeightFormat("FP8 E5M2, fp32 scale amax/57344 per output row", ROW, 8, 32, -61440, 61440),
    "int8": WeightFormat("INT8 symmetric, codes -127..127, fp32 scale amax/127 per output row",
                         ROW, 8, 32, -127.5, 127.5),
    "int8_g32": WeightFormat("INT8 symmetric per 32: codes -128..127, fp32 signed scale max/-128 (ONNX MatMulNBits)",
                             32, 8, 32, -128.5, 127.5),
    **{f"int4_g{n}{s}": _int4(n, bool(s)) for n in (32, 64, 128) for s in ("", "_asym")},
    "q8_0": WeightFormat("GGUF Q8_0: int8 codes, fp16 scale amax/127 per 32", 32, 8, 16, -127.5, 127.5),
    "q4_0": WeightFormat("GGUF Q4_0: codes -8..7, fp16 signed scale max/-8 per 32", 32, 4, 16, -8.5, 7.5),
    "q4_1": WeightFormat("GGUF Q4_1: codes 0..15, fp16 scale (max-min)/15 and fp16 min per 32",
                         32, 4, 32, -0.5, 15.5),
    "q5_0": WeightFormat("GGUF Q5_0: codes -16..15, fp16 signed scale max/-16 per 32", 32, 5, 16, -16.5, 15.5),
    "q5_1": WeightFormat("GGUF Q5_1: codes 0..31, fp16 scale (max-min)/31 and fp16 min per 32",
                         32, 5, 32, -0.5, 31.5),
    # K-quants: per 32 (16) a 6-bit scale and min (an int8 scale), plus fp16 d and dmin (d) per 256
    "q4_k": WeightFormat("GGUF Q4_K: codes 0..15, scale d*sc and min dmin*m per 32 (6-bit sc, m; fp16 d, dmin "
                         "per 256)", 32, 4, 16, -0.5, 15.5, divides=256),
    "q5_k": WeightFormat("GGUF Q5_K: codes 0..31, scale d*sc and min dmin*m per 32 (6-bit sc, m; fp16 d, dmin "
                         "per 256)", 32, 5, 16, -0.5, 31.5, divides=256),
    "q6_k": WeightFormat("GGUF Q6_K: codes -32..31, scale d*sc per 16 (int8 sc; fp16 d per 256)",
                         16, 6, 9, -32.5, 31.5, divides=256),
    "ternary": WeightFormat("BitNet b1.58 ternary: codes -1/0/1, absmean scale per tensor (2-bit codes)",
                            TENSOR, 2, 32, -1.5, 1.5),
    "ternary_b256": WeightFormat("Ternary, fp16 absmean scale per 256: GGUF TQ2_0 (2.0625 bits) or TQ1_0 (1.6875)",
                                 256, 2, 16, -1.5, 1.5),
    "binary": WeightFormat("FBI-LLM binary: sign codes, mean |w| scale per output row", ROW, 1, 32, -2, 2),
    "binary_b128": WeightFormat("Binary, fp16 mean |w| scale per 128: GGUF Q1_0", 128, 1, 16, -2, 2),
    "f16": WeightFormat("IEEE half precision, no scale: the fallback for rows no block divides",
                        TENSOR, 16, 0, -65520, 65520),
}
KQUANTS = ("q4_k", "q5_k", "q6_k")
# formats whose quantize(dequantize(quantize(w))) equals quantize(w). Not nvfp4: Model-Optimizer's
# tensor scale amax/2688 need not survive a round trip through 6 * 448 * scale in float32, and its
# round-to-nearest-even E4M3 block scales drift where they are subnormal. Not the K-quants: their
# reference is a search, settled to a fixed point where one more pass reaches one (nearly always).
IDEMPOTENT = tuple(name for name in FORMATS if name not in ("nvfp4", *KQUANTS))


@dataclass
class QTensor:
    format: str  # a FORMATS name
    shape: tuple[int, ...]  # the weight's [rows, cols]; blocks run along cols
    codes: torch.Tensor  # [rows, cols] grid index per element (see `_grid_values` for each format)
    scales: torch.Tensor  # float32 [rows, groups per row], [rows, 1] per row or [1, 1] per tensor
    zeros: torch.Tensor | None = None  # float32 per-group minimum of the asymmetric formats
    tensor_scale: float | None = None  # NVFP4's fp32 second-level scale
    super_scales: torch.Tensor | None = None  # K-quants: fp16 d (and dmin) [rows, supers, 1 or 2]


def weight_format(name: str) -> WeightFormat:
    if name not in FORMATS:
        raise ShrinkError(f"Unknown weight format '{name}'; choose one of: {', '.join(FORMATS)}.")
    return FORMATS[name]


def block_size(name: str) -> int:
    """What a row's length must be a multiple of (1: any)."""
    f = weight_format(name)
    return f.divides or max(f.block, 1)


def scale_group_size(name: str, shape: tuple[int, ...]) -> int:
    """How many elements share one scale."""
    f = weight_format(name)
    return f.block if f.block > 0 else shape[-1] if f.block == ROW else int(np.prod(shape))


def effective_bits(name: str, shape: tuple[int, ...], ggml_type: str | None = None) -> float:
    """Bits per weight with scales and zeros, as stored (ggml_type="TQ1_0": ternary_b256 in base 3)."""
    f = weight_format(name)
    numel = int(np.prod(shape))
    # TQ1_0 packs 240 codes 5 to a byte and 16 codes 4 to a byte: 52 bytes per 256
    element = 52 * 8 / 256 if (name, ggml_type) == ("ternary_b256", "TQ1_0") else f.element_bits
    return element + f.group_bits / scale_group_size(name, shape) + f.tensor_bits / numel


# ---- rounding helpers -------------------------------------------------------------------------

def _round_minifloat(x: torch.Tensor, mantissa_bits: int, min_exponent: int, largest: float) -> torch.Tensor:
    """Round to the nearest value of a small float format, ties to even, saturating at `largest`:
    the quantum is 2^(exponent - mantissa_bits), flat below the smallest normal (subnormals)."""
    a = x.abs()
    exponent = (torch.frexp(a).exponent - 1).clamp(min=min_exponent)
    quantum = torch.ldexp(torch.ones_like(a), exponent - mantissa_bits)
    return torch.copysign((torch.round(a / quantum) * quantum).clamp(max=largest), x)


def e4m3_round(x: torch.Tensor) -> torch.Tensor:
    """FP8 E4M3 (E4M3FN) rounding, as torch's float8_e4m3fn cast (which saturates at 448)."""
    return _round_minifloat(x.float(), 3, -6, 448.0)


def e2m1_round(x: torch.Tensor) -> torch.Tensor:
    """FP4 E2M1 rounding, ties to even (Model-Optimizer's and the hardware's rule), saturating at 6."""
    return _round_minifloat(x.float(), 1, 0, 6.0)


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _round_half_away(x: torch.Tensor) -> torch.Tensor:
    # C roundf, written as gguf's np_roundf (no x + 0.5, which rounds in float32)
    a = x.abs()
    floor = torch.floor(a)
    return torch.copysign(floor + (a - floor >= 0.5).float(), x)


def _mean_abs(x: torch.Tensor) -> torch.Tensor:
    # float64 sums are exact for on-grid groups, so a binary group of +-s gives back s exactly
    return x.abs().double().mean(-1, keepdim=True).float()


def _settle(scale: torch.Tensor, qmax: float) -> torch.Tensor:
    """The float32 nearest `scale` (within 2 ulps) that fl(fl(qmax * s) / qmax) maps to itself, so
    that re-quantizing the grid (whose largest value is qmax * s) finds s again."""
    best, found = scale.clone(), (scale * qmax) / qmax == scale
    for steps in (1, 2):
        for toward in (float("inf"), float("-inf")):
            candidate = scale
            for _ in range(steps):
                candidate = torch.nextafter(candidate, torch.full_like(candidate, toward))
            ok = ~found & ((candidate * qmax) / qmax == candidate)
            best, found = torch.where(ok, candidate, best), found | ok
    return best


def _e2m1_code(u: torch.Tensor) -> torch.Tensor:
    """Model-Optimizer's _cast_fp4: ordinal among the E2M1 midpoints, ties to even, sign in bit 3
    (a negative value that rounds to 0 keeps code 8)."""
    a = u.abs()
    ordinal = sum((a > b).to(torch.uint8) for b in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0))
    ordinal = ordinal + ((a == 0.75) | (a == 1.75) | (a == 3.5)).to(torch.uint8)
    return ordinal + 8 * (u < 0).to(torch.uint8)


def _gguf_fp4_code(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """ggml's best_index_mxfp4: the index into the doubled table (0,1,2,3,4,6,8,12,0,-1,...) of the
    value nearest x / d, the lowest index on ties (the smaller magnitude; +0 for any zero). The
    midpoints times d are exact in float32, so comparing with them equals gguf's float32 argmin."""
    a = x.abs()
    index = sum((a > m * d).to(torch.uint8) for m in (0.5, 1.5, 2.5, 3.5, 5.0, 7.0, 10.0))
    code = index + 8 * ((x < 0) & (index > 0)).to(torch.uint8)
    return torch.where(d == 0, torch.zeros_like(code), code)  # d = 0: every error ties, index 0


def _ggml_ue4m3(x: torch.Tensor) -> torch.Tensor:
    """ggml_fp32_to_ue4m3 (as gguf's NVFP4.fp32_to_ue4m3): a byte; mantissa rounded half up, values
    of 256 and more to 0x7E (448), subnormals as int(x * 512 + 0.5) capped at 7."""
    x = x.float().clamp(0.0, 448.0)
    bits = x.view(torch.int32)
    exponent = ((bits >> 23) & 0xFF) - 127 + 7
    subnormal = (x * 512.0 + 0.5).to(torch.int32).clamp(0, 7)
    mantissa = ((bits >> 20) & 7) + ((bits >> 19) & 1)
    carry = mantissa > 7
    exponent_n = torch.where(carry, exponent + 1, exponent)
    normal = torch.where(exponent_n >= 15, 0x7E, (exponent_n << 3) | torch.where(carry, 0, mantissa))
    byte = torch.where(exponent <= 0, subnormal, torch.where(exponent >= 15, 0x7E, normal))
    return torch.where(x <= 0, 0, byte).to(torch.uint8)


def _lookup(table: tuple[float, ...], codes: torch.Tensor) -> torch.Tensor:
    return torch.tensor(table, dtype=torch.float32, device=codes.device)[codes.long()]


# ---- quantizers: each takes float32 blocks [rows, groups, n] and returns codes, scales(, zeros) -----

def _q8_0(b):  # gguf Q8_0: d = amax/127, codes roundf(x * (1/d)), d stored fp16
    d = b.abs().amax(-1, keepdim=True) / 127
    inverse = torch.where(d == 0, 0.0, 1 / d)
    return _round_half_away(b * inverse).to(torch.int8), _fp16(d)


def _signed_max(b, half: int):  # gguf Q4_0 (half 8) / Q5_0 (16): d = (the signed max) / -half,
    # codes trunc(x * (1/d) + half + 0.5) clipped to 0..2 half - 1, less half
    top = b.gather(-1, b.abs().argmax(-1, keepdim=True))
    d = top / -half
    inverse = torch.where(d == 0, 0.0, 1 / d)
    shifted = b * inverse + (half + 0.5)  # two float32 roundings, as numpy does them
    return (torch.trunc(shifted).clamp(0, 2 * half - 1) - half).to(torch.int8), _fp16(d)


def _min_max(b, top_code: int):  # gguf Q4_1 (15) / Q5_1 (31): d = (max - min)/top_code,
    # codes trunc((x - min) * (1/d) + 0.5) clipped to 0..top_code; d, min fp16
    top, low = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d = (top - low) / top_code
    inverse = torch.where(d == 0, 0.0, 1 / d)
    shifted = (b - low) * inverse + 0.5
    return torch.trunc(shifted).clamp(0, top_code).to(torch.uint8), _fp16(d), _fp16(low)


def _int4(b):  # the Q4_0 scale rule, but rounding x / (the stored fp16 scale) half to even
    d = _fp16(b.gather(-1, b.abs().argmax(-1, keepdim=True)) / -8)
    codes = torch.round(b / d).clamp(-8, 7)
    return torch.where(d == 0, 0.0, codes).to(torch.int8), d


def _int8_g32(b):  # the same signed-max rule at 8 bits: -128 * d is the block's largest magnitude
    d = b.gather(-1, b.abs().argmax(-1, keepdim=True)) / -128
    codes = torch.round(b / d).clamp(-128, 127)
    return torch.where(d == 0, 0.0, codes).to(torch.int8), d


def _int4_asym(b):  # the Q4_1 scale rule, rounding (x - stored min) / (stored scale) half to even
    top, low = b.amax(-1, keepdim=True), b.amin(-1, keepdim=True)
    d, m = _fp16((top - low) / 15), _fp16(low)
    codes = torch.round((b - m) / d).clamp(0, 15)
    return torch.where(d == 0, 0.0, codes).to(torch.uint8), d, m


def _mxfp4(b):  # gguf MXFP4: e = floor(log2(amax)) - 2 + 127 (float32 log2, as numpy), nearest value
    amax = b.abs().amax(-1, keepdim=True)
    a = amax.cpu().numpy()
    with np.errstate(divide="ignore"):
        e = np.where(a > 0, np.floor(np.log2(a)) - 2 + 127, 0).clip(0, 254).astype(np.int32)  # clip: |x| < 2^-125
    e = torch.from_numpy(e).to(b.device)
    # ggml_e8m0_to_fp32_half, built from its bits: 2^(e - 128), subnormal below e = 2
    half = torch.where(e < 2, 0x00200000 << e.clamp(max=1), (e - 1).clamp(min=0) << 23).to(torch.int32)
    half = half.view(torch.float32)
    return _gguf_fp4_code(b, half), half * 2


def _nvfp4_gguf(b):  # llama.cpp quantize_row_nvfp4_ref: byte = ue4m3(amax / 6), nearest value
    amax = b.abs().amax(-1, keepdim=True)
    scale = _lookup(UE4M3_VALUES, _ggml_ue4m3(amax / 6))
    codes = _gguf_fp4_code(b, scale / 2)
    # That rule is idempotent except with subnormal scales (amax < 0.094), where a block already on
    # the grid can round to another scale: such a block keeps a scale it is exactly on instead.
    off = (scale < 2.0**-6).squeeze(-1) & ~(_lookup(E2M1_VALUES, codes) * scale == b).all(-1)
    for k in (6.0, 4.0, 3.0, 2.0, 1.5, 1.0, 0.5):  # the block's largest value as each E2M1 magnitude
        candidate = amax / k
        todo = off & (_lookup(UE4M3_VALUES, _ggml_ue4m3(candidate)) == candidate).squeeze(-1)
        if not todo.any():  # off-grid weights end here: amax / k is almost never a UE4M3 value
            continue
        where = todo.nonzero(as_tuple=True)
        trial = _gguf_fp4_code(b[where], candidate[where] / 2)
        exact = (_lookup(E2M1_VALUES, trial) * candidate[where] == b[where]).all(-1)
        hit = tuple(i[exact] for i in where)
        scale[hit], codes[hit], off[hit] = candidate[hit], trial[exact], False
    return codes, scale


def _nvfp4(w):  # Model-Optimizer NVFP4QTensor.quantize, in its order of float32 operations
    b = w.reshape(w.shape[0], -1, 16)
    tensor_scale = w.abs().amax() / (6.0 * 448.0)
    block_scale = b.abs().amax(-1, keepdim=True) / (6.0 * tensor_scale)
    # all-zero blocks take 1.0 (Model-Optimizer), as does everything of an all-zero weight (0/0 there)
    block_scale = torch.where((block_scale == 0) | block_scale.isnan(), 1.0, block_scale)
    block_scale = block_scale.to(torch.float8_e4m3fn).float()
    per_block = block_scale * tensor_scale
    codes = _e2m1_code(b / per_block)
    codes = torch.where(per_block == 0, torch.zeros_like(codes), codes)  # underflowed scale: value 0
    return codes, block_scale, float(tensor_scale)


def _ternary_scale(b, fp16: bool):
    """absmean; a group already ternary (its nonzero magnitudes all one value) keeps that value,
    which the absmean of a group with zeros would shrink."""
    scale = _mean_abs(b)
    scale = _fp16(scale) if fp16 else scale
    a = b.abs()
    top = a.amax(-1, keepdim=True)
    on_grid = ((a == 0) | (a == top)).all(-1, keepdim=True) & (top > 0)
    if fp16:
        on_grid &= _fp16(top) == top
    return torch.where(on_grid, top, scale)


def _ternary_codes(b, scale):  # BitNet: clip(round(w / scale), -1, 1), ties to even (0.5 -> 0)
    codes = torch.round(b / scale).clamp(-1, 1)
    return torch.where(scale == 0, 0.0, codes).to(torch.int8)


def _sign(b):  # sign with sign(0) = +1, as llama.cpp's Q1_0 (x >= 0 sets the bit)
    return torch.where(b >= 0, 1, -1).to(torch.int8)


_BLOCK_QUANTIZERS = {"q8_0": _q8_0, "q4_0": lambda b: _signed_max(b, 8), "q4_1": lambda b: _min_max(b, 15),
                     "q5_0": lambda b: _signed_max(b, 16), "q5_1": lambda b: _min_max(b, 31),
                     "mxfp4": _mxfp4, "nvfp4_gguf": _nvfp4_gguf,
                     "int8_g32": _int8_g32}


def _per_scale(w, qmax: float, per_row: bool):
    amax = w.abs().amax(-1, keepdim=True) if per_row else w.abs().amax().reshape(1, 1)
    scale = _settle(amax / qmax, qmax)
    return scale, torch.where(scale == 0, 1.0, scale)


def quantize(weight: torch.Tensor, name: str) -> QTensor:
    """Codes and scales of a 2-D weight on format `name` (computed in float32 on its device)."""
    f = weight_format(name)
    if weight.dim() != 2:
        raise ShrinkError(f"Weight formats take 2-D weights [rows, cols]; got shape {tuple(weight.shape)}.")
    rows, cols = shape = tuple(weight.shape)
    if cols % block_size(name):
        raise ShrinkError(f"A {rows}x{cols} weight does not split into {name}'s {block_size(name)}-element "
                          f"blocks: its columns ({cols}) must be a multiple of {block_size(name)}.")
    w = weight.detach().float()
    b = w.reshape(rows, -1, f.block) if f.block > 0 else w
    zeros = tensor_scale = None
    if name == "f16":  # codes: the fp16 bit pattern
        codes, scales = w.to(torch.float16).view(torch.int16), torch.ones(1, 1, device=w.device)
    elif name == "nvfp4":
        codes, scales, tensor_scale = _nvfp4(w)
    elif name.startswith("fp8"):
        fmax = 448.0 if "e4m3" in name else 57344.0
        scales, safe = _per_scale(w, fmax, name.endswith("channel"))
        dtype = torch.float8_e4m3fn if "e4m3" in name else torch.float8_e5m2
        codes = (w / safe).to(dtype).view(torch.uint8)
    elif name == "int8":
        scales, safe = _per_scale(w, 127.0, True)
        codes = torch.round(w / safe).clamp(-127, 127).to(torch.int8)
    elif name in ("ternary", "ternary_b256"):
        g = b if f.block > 0 else w.reshape(1, 1, -1)
        scales = _ternary_scale(g, fp16=f.block > 0)
        codes = _ternary_codes(g, scales)
    elif name == "binary":
        scales, codes = _mean_abs(w), _sign(w)
    elif name == "binary_b128":
        scales, codes = _fp16(_mean_abs(b)), _sign(b)
    elif name in KQUANTS:
        return _kquant(name, shape, kquants.quantize(w.reshape(-1, kquants.QK_K), name))
    else:
        quantizer = _BLOCK_QUANTIZERS.get(name) or (_int4_asym if name.endswith("_asym") else _int4)
        codes, scales, *rest = quantizer(b)
        zeros = rest[0] if rest else None
    groups = cols // f.block if f.block > 0 else 1
    scales = scales.reshape(-1, groups).float()
    return QTensor(name, shape, codes.reshape(shape), scales,
                   None if zeros is None else zeros.reshape(rows, groups).float(), tensor_scale)


def _kquant(name: str, shape: tuple[int, int], params) -> QTensor:
    """A QTensor from kquants' (codes, d, dmin, sc, m): scale d*sc and zero -(dmin*m) per group (both
    exact in float32), so that dequantize is llama.cpp's (d*sc)*q - dmin*m."""
    codes, d, dmin, sc, m = params[:5]
    rows, cols = shape
    scales = (d[:, None] * sc).reshape(rows, -1)
    if name == "q6_k":
        return QTensor(name, shape, codes.reshape(shape), scales, super_scales=d.reshape(rows, -1, 1))
    zeros = -(dmin[:, None] * m).reshape(rows, -1)
    return QTensor(name, shape, codes.reshape(shape), scales, zeros, super_scales=torch.stack([d, dmin], -1).reshape(rows, -1, 2))


def _expand(per_group: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    rows, cols = shape
    return per_group.repeat_interleave(cols // per_group.shape[1], dim=1).expand(rows, cols)


def element_scale(q: QTensor) -> torch.Tensor:
    """[rows, cols] float32: what each element's grid value is multiplied by."""
    scales = q.scales
    if q.tensor_scale is not None:  # NVFP4: block scale x tensor scale, one float32 product (Model-Optimizer)
        scales = scales * torch.tensor(q.tensor_scale, dtype=torch.float32, device=scales.device)
    return _expand(scales, q.shape)


def _grid_values(q: QTensor) -> torch.Tensor:
    if q.format in ("nvfp4", "nvfp4_gguf", "mxfp4"):
        return _lookup(E2M1_VALUES, q.codes)  # the 4-bit E2M1 code
    if q.format == "f16":
        return q.codes.view(torch.float16).float()
    if q.format.startswith("fp8"):  # the float8 bit pattern
        return q.codes.view(torch.float8_e4m3fn if "e4m3" in q.format else torch.float8_e5m2).float()
    return q.codes.float()  # integer codes: signed levels, or 0..15 above the zero for _asym / q4_1


def dequantize(q: QTensor) -> torch.Tensor:
    """float32 [rows, cols]: grid value x scale (+ zero), in the references' float32 order."""
    out = _grid_values(q) * element_scale(q)
    if q.zeros is not None:
        out = out + _expand(q.zeros, q.shape)
    return out


def quantize_dequantize(weight: torch.Tensor, name: str) -> torch.Tensor:
    """The weight as format `name` represents it (float32, same shape and device)."""
    return dequantize(quantize(weight, name))


def from_grid_values(weight: torch.Tensor, name: str) -> QTensor:
    """Codes and scales of a weight already on its grid (a trained student's): quantize() itself,
    which gives an on-grid weight back unchanged for every format in IDEMPOTENT; a K-quant super-block
    it does not give back takes scales kquants.recover finds (a weight off its grid stays off it)."""
    if name not in KQUANTS:
        return quantize(weight, name)
    quantize(weight, name)  # the shape checks
    return _kquant(name, tuple(weight.shape), kquants.from_values(weight.detach().float().reshape(-1, kquants.QK_K), name))


def clipped(weight: torch.Tensor, q: QTensor) -> torch.Tensor:
    """Where the grid saturates: x beyond the extreme grid value by more than half the last step, so
    that rounding without the clip would have gone further (absmax scales clip nothing)."""
    f = weight_format(q.format)
    scale = element_scale(q)
    shifted = weight.detach().float() - (_expand(q.zeros, q.shape) if q.zeros is not None else 0.0)
    units = torch.where(scale == 0, 0.0, shifted / scale)
    return (units < f.lo) | (units > f.hi)
