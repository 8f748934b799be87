"""GGUF K-quants (Q4_K, Q5_K, Q6_K): llama.cpp's reference quantizers, step by step in float32.

Super-blocks of 256 weights. Q4_K / Q5_K: fp16 d and dmin per super-block, a 6-bit scale sc and
min m per 32, codes 0..15 / 0..31, value d*sc*q - dmin*m. Q6_K: fp16 d, an int8 scale per 16,
codes -32..31, value d*sc*q. Each function follows ggml-quants.c (quantize_row_q4_K_ref,
make_qkx2_quants, quantize_row_q6_K_ref, make_qx_quants) in its order of float32 operations,
sums accumulated left to right; nearest_int is round half to even, as its 1.5 * 2^23 trick.

The reference is a search, so re-quantizing its output need not find the same scales: `recover`
finds scales an on-grid super-block is exactly on (what export needs from a trained student).
"""

from __future__ import annotations

import numpy as np
import torch

QK_K = 256


def _f32(value: float) -> torch.Tensor:
    return torch.tensor(np.float32(value))


def _sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over the first axis (the elements of a group, kept first so that each step is one
    contiguous slice) from left to right in float32, as C's `for` loop."""
    acc = t[0]
    for i in range(1, t.shape[0]):
        acc = acc + t[i]
    return acc


def _fp16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.float16).float()


def _make_qkx2(x, weights, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants (use_mad false) on groups laid out [n, ...]: (scale, the_min, L [n, ...])."""
    low = x.amin(0).clamp(max=0)
    high = x.amax(0)
    sum_w = _sum(weights)
    sum_x = _sum(weights * x)
    flat = high == low
    span = torch.where(flat, 1.0, high - low)
    iscale = nmax / span
    scale = 1 / iscale
    levels = torch.round(iscale * (x - low)).clamp(0, nmax)
    diff = scale * levels + low - x
    best = _sum(weights * (diff * diff))
    for step in range(nstep + 1):
        factor = np.float32(rmin) + np.float32(rdelta) * np.float32(step) + np.float32(nmax)
        # the search moves `min` as it goes, and later steps measure from the moved one (as the C does)
        span = torch.where(flat, 1.0, high - low)
        trial = torch.round((_f32(factor) / span) * (x - low)).clamp(0, nmax)
        wl = weights * trial
        sum_l, sum_l2, sum_xl = _sum(wl), _sum(wl * trial), _sum(wl * x)
        det = sum_w * sum_l2 - sum_l * sum_l
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / det
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det
        positive = this_min > 0
        this_scale = torch.where(positive, sum_xl / sum_l2, this_scale)
        this_min = torch.where(positive, 0.0, this_min)
        diff = this_scale * trial + this_min - x
        error = _sum(weights * (diff * diff))
        better = (det > 0) & (error < best) & ~flat
        levels = torch.where(better, trial, levels)
        best = torch.where(better, error, best)
        scale = torch.where(better, this_scale, scale)
        low = torch.where(better, this_min, low)
    levels = torch.where(flat, 0.0, levels)
    return torch.where(flat, 0.0, scale), -low, levels


def quantize_qk(blocks: torch.Tensor, nmax: int):
    """quantize_row_q4_K_ref (nmax 15) / q5_K_ref (nmax 31) on [S, 256] float32 super-blocks:
    (codes [S, 8, 32], d [S], dmin [S], sc [S, 8], m [S, 8]), d and dmin as fp16 values."""
    x = blocks.reshape(-1, 8, 32).permute(2, 0, 1).contiguous()  # [32, S, 8]: elements first
    av_x = torch.sqrt(_sum(x * x) / 32)
    weights = av_x + x.abs()
    rmin, nstep = (-1.0, 20) if nmax == 15 else (-0.5, 15)
    scales, mins, levels = _make_qkx2(x, weights, nmax, rmin, 0.1, nstep)
    # C keeps the largest above a starting 0 (so +0 where every min is -0, as an all-zero group's is)
    max_scale, max_min = (torch.where(t > 0, t, 0.0) for t in (scales.amax(-1), mins.amax(-1)))
    inv_scale = torch.where(max_scale > 0, 63 / max_scale, 0.0)
    inv_min = torch.where(max_min > 0, 63 / max_min, 0.0)
    sc = torch.round(inv_scale[:, None] * scales).clamp(max=63)
    m = torch.round(inv_min[:, None] * mins).clamp(max=63)
    d, dmin = _fp16(max_scale / 63), _fp16(max_min / 63)
    step, offset = d[:, None] * sc, dmin[:, None] * m
    codes = torch.round((x + offset) / torch.where(step == 0, 1.0, step)).clamp(0, nmax)
    codes = torch.where(step == 0, levels, codes)  # `if (!d) continue`: the search's codes stay
    return codes.permute(1, 2, 0).to(torch.uint8), d, dmin, sc, m


def _make_qx(x: torch.Tensor, nmax: int):
    """make_qx_quants with rmse_type 1 and no weights on groups laid out [n, ...]: (scale, L - nmax)."""
    top = x.gather(0, x.abs().argmax(0, keepdim=True))[0]  # the first largest |x|
    zero = top.abs() < 1e-15
    safe_top = torch.where(zero, 1.0, top)
    w = x * x

    def trial(iscale):
        levels = torch.round(iscale * x).clamp(-nmax, nmax - 1)
        return levels, _sum(w * x * levels), _sum(w * levels * levels)

    levels, sumlx, suml2 = trial(-nmax / safe_top)
    scale = torch.where(suml2 != 0, sumlx / suml2, 0.0)
    best = scale * sumlx
    for step in (*range(-9, 0), *range(1, 10)):
        factor = np.float32(nmax) + np.float32(0.1) * np.float32(step)
        candidate, slx, sl2 = trial(-_f32(factor) / safe_top)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        levels = torch.where(better, candidate, levels)
        scale = torch.where(better, slx / sl2, scale)
        best = torch.where(better, scale * slx, best)
    return torch.where(zero, 0.0, scale), torch.where(zero, -nmax, levels)


def quantize_q6k(blocks: torch.Tensor):
    """quantize_row_q6_K_ref on [S, 256]: (codes -32..31 [S, 16, 16], d [S], sc [S, 16])."""
    x = blocks.reshape(-1, 16, 16).permute(2, 0, 1).contiguous()  # [16, S, 16]: elements first
    scales, levels = _make_qx(x, 32)
    max_scale = scales.gather(-1, scales.abs().argmax(-1, keepdim=True))[:, 0]
    empty = max_scale.abs() < 1e-15
    iscale = -128 / torch.where(empty, 1.0, max_scale)
    d = torch.where(empty, 0.0, _fp16(1 / iscale))
    sc = torch.where(empty[:, None], 0.0, torch.round(iscale[:, None] * scales).clamp(max=127))
    step = d[:, None] * sc
    codes = torch.round(x / torch.where(step == 0, 1.0, step)).clamp(-32, 31)
    codes = torch.where(step == 0, levels, codes)
    codes = torch.where(empty[:, None], -32, codes)  # an empty super-block is all zero bytes
    return codes.permute(1, 2, 0).to(torch.int8), d, sc


# ---- fixed points and recovery ----------------------------------------------------------------
# A trained student's weights are the grid values of its last forward; export must find scales they
# are exactly on. `settle` makes the projection a fixed point where one more reference pass reaches
# it (llama.cpp's choice is kept wherever it already is one), and `recover` searches scales
# exhaustively for the rare super-block that still moves.

def values_qk(codes, d, dmin, sc, m):
    """llama.cpp's dequantize_row_q4_K / q5_K: (d*sc) * q - dmin*m in float32, [.., 8, 32]."""
    return (d[..., None] * sc)[..., None] * codes.float() - (dmin[..., None] * m)[..., None]


def values_q6k(codes, d, sc):
    """dequantize_row_q6_K: (d*sc) * q, [.., 16, 16]."""
    return (d[..., None] * sc)[..., None] * codes.float()


def _gaps(x: torch.Tensor) -> torch.Tensor:
    """Smallest positive difference between the values of each group (inf for a constant group)."""
    ordered = x.sort(-1).values
    steps = ordered[..., 1:] - ordered[..., :-1]
    return torch.where(steps > 0, steps, torch.inf).amin(-1)


def _search(x, d, offset_unit, nmax: int, signed: bool):
    """Every scale (and min) index for each group of x [S, G, n] given a super-block's fp16 d
    (and dmin) [S]: the first (sc, m) whose grid holds the whole group, or ok False."""
    scales = torch.arange(-128, 128.0) if signed else torch.arange(64.0)
    mins = torch.arange(64.0) if offset_unit is not None else torch.zeros(1)
    sc, m = torch.meshgrid(scales, mins, indexing="ij")
    sc, m = sc.reshape(-1), m.reshape(-1)
    step = d[:, None, None] * sc  # [S, 1, C]
    offset = (offset_unit[:, None, None] * m) if offset_unit is not None else torch.zeros_like(step)
    low, high = (-32, 31) if signed else (0, nmax)
    safe = torch.where(step == 0, 1.0, step)
    codes = torch.round((x[..., None, :] + offset[..., None]) / safe[..., None]).clamp(low, high)
    held = (step[..., None] * codes - offset[..., None] == x[..., None, :]).all(-1)  # [S, G, C]
    first = held.float().argmax(-1)
    return sc[first], m[first], held.any(-1)


def recover(x: torch.Tensor, kind: str, hint_d: torch.Tensor, hint_dmin: torch.Tensor | None):
    """Scales that on-grid super-blocks x [S, 256] are exactly on: candidates for d (and dmin) are
    the hint (one more reference pass) and each group's smallest gap / 63 (or / 128) and its most
    negative value / 63, the largest-index sub-scales being 63 (-128 for Q6_K) in the reference's
    own output. Returns (d, dmin, sc, m, ok); ok False where no candidate holds every value."""
    signed = kind == "q6_k"
    groups = x.reshape(x.shape[0], -1, 16 if signed else 32)
    gaps = _gaps(groups)
    top = 128.0 if signed else 63.0
    signs = (1, -1) if signed else (1,)
    d_options = [hint_d] + [_fp16(s * gaps[:, j] / top) for j in range(groups.shape[1]) for s in signs]
    # last, only for what is still unresolved: the widest group's gap over every smaller sub-scale
    d_options += [_fp16(s * gaps.amax(-1) / k) for k in range(int(top) - 1, 0, -1) for s in signs]
    dmin_options = [None] if signed else [hint_dmin, torch.zeros_like(hint_dmin)] + [
        _fp16(-groups[:, j].amin(-1).clamp(max=0) / 63) for j in range(groups.shape[1])]
    count = x.shape[0]
    d, dmin = torch.zeros(count), torch.zeros(count)
    sc = torch.zeros(groups.shape[:2])
    m = torch.zeros(groups.shape[:2])
    ok = torch.zeros(count, dtype=torch.bool)
    for d_try in d_options:
        for dmin_try in dmin_options:
            todo = (~ok & torch.isfinite(d_try)).nonzero().squeeze(-1)
            if dmin_try is not None:
                todo = todo[torch.isfinite(dmin_try[todo])]
            if todo.numel() == 0:
                continue
            for chunk in todo.split(8):
                unit = None if dmin_try is None else dmin_try[chunk]
                s, mm, held = _search(groups[chunk], d_try[chunk], unit, 31 if kind == "q5_k" else 15, signed)
                good = held.all(-1)
                hit = chunk[good]
                d[hit], sc[hit], m[hit], ok[hit] = d_try[hit], s[good], mm[good], True
                if unit is not None:
                    dmin[hit] = dmin_try[hit]
    return d, dmin, sc, m, ok


def _reference(blocks: torch.Tensor, kind: str):
    """One reference pass on [S, 256]: (params (codes, d, dmin, sc, m), values [S, 256])."""
    if kind == "q6_k":
        codes, d, sc = quantize_q6k(blocks)
        return (codes, d, torch.zeros_like(d), sc, torch.zeros_like(sc)), values_q6k(codes, d, sc).reshape(blocks.shape)
    codes, d, dmin, sc, m = quantize_qk(blocks, 15 if kind == "q4_k" else 31)
    return (codes, d, dmin, sc, m), values_qk(codes, d, dmin, sc, m).reshape(blocks.shape)


SETTLE_ROUNDS = 4


def quantize(blocks: torch.Tensor, kind: str):
    """The reference's scales for super-blocks [S, 256], re-run on its own output where that output
    is not yet a fixed point of it (up to SETTLE_ROUNDS more passes): (codes, d, dmin, sc, m)."""
    params, values = _reference(blocks, kind)
    params = [p.clone() for p in params]
    moving = torch.arange(blocks.shape[0], device=blocks.device)
    for _ in range(SETTLE_ROUNDS):
        again, again_values = _reference(values[moving], kind)
        moved = (again_values != values[moving]).any(-1)
        moving, again, again_values = moving[moved], [p[moved] for p in again], again_values[moved]
        if moving.numel() == 0:
            break
        for p, q in zip(params, again):
            p[moving] = q
        values[moving] = again_values
    # the weights themselves take the nearest codes on the settled scales (the reference's last step)
    codes, d, dmin, sc, m = params
    group = 16 if kind == "q6_k" else 32
    x = blocks.reshape(blocks.shape[0], -1, group)
    step, offset = (d[:, None] * sc)[..., None], (dmin[:, None] * m)[..., None]
    low, high = (-32, 31) if kind == "q6_k" else (0, 31 if kind == "q5_k" else 15)
    nearest = torch.round((x + offset) / torch.where(step == 0, 1.0, step)).clamp(low, high)
    codes = torch.where(step == 0, codes.float(), nearest).to(codes.dtype)
    return codes, d, dmin, sc, m


def from_values(x: torch.Tensor, kind: str):
    """Scales for super-blocks [S, 256] already on the grid: `quantize`, and `recover` for any it does
    not give back exactly. Returns (codes, d, dmin, sc, m, ok)."""
    codes, d, dmin, sc, m = quantize(x, kind)
    values = (values_q6k(codes, d, sc) if kind == "q6_k" else values_qk(codes, d, dmin, sc, m)).reshape(x.shape)
    off = (values != x).any(-1).nonzero().squeeze(-1)
    ok = torch.ones(x.shape[0], dtype=torch.bool)
    if off.numel():
        rd, rdmin, rsc, rm, found = recover(x[off], kind, d[off], dmin[off])
        hit = off[found]
        d[hit], dmin[hit], sc[hit], m[hit] = rd[found], rdmin[found], rsc[found], rm[found]
        ok[off[~found]] = False
        group = 16 if kind == "q6_k" else 32
        groups = x[hit].reshape(hit.numel(), -1, group)
        step = (d[hit][:, None] * sc[hit])[..., None]
        offset = (dmin[hit][:, None] * m[hit])[..., None]
        low, high = (-32, 31) if kind == "q6_k" else (0, 31 if kind == "q5_k" else 15)
        new = torch.round((groups + offset) / torch.where(step == 0, 1.0, step)).clamp(low, high)
        codes[hit] = new.reshape(codes[hit].shape).to(codes.dtype)
    return codes, d, dmin, sc, m, ok
