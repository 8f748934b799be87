"""Post-training calibration of a quantization plan: weights are changed so that their grid fits better.

Every method edits full-precision weights only; the grid itself is recomputed from them at
quantization time (compress/quant/fakequant.py), so the exported grid is always the student's.
- max: nothing to do, scales come from each block's absolute maximum.
- mse: for each scale group (block, row or tensor), clip the weights at the fraction of their
  maximum that minimises the squared quantization error of that group.
- awq: activation-aware scaling (AWQ, Lin et al. 2024). Input channels that carry large
  activations are scaled up in the weight and the same factor is divided out of the operation that
  feeds them (a norm's weight or the previous projection's rows), which leaves the model's function
  unchanged in full precision and gives salient channels a finer grid. The exponent of the scaling
  is searched per group of projections on calibration activations.
"""

from __future__ import annotations

from typing import Any, Callable

from shrink import blocks
from shrink.compress.quant.plan import QuantPlan
from shrink.errors import ShrinkError
from shrink.progress import ProgressLines

METHODS = ("auto", "max", "mse", "awq")
AWQ_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5
AWQ_EXPONENTS = tuple(i / 20 for i in range(21))
AWQ_TOKENS = 4096  # calibration tokens kept per projection input: enough for the channel statistics


def calibrate(model: Any, plan: QuantPlan, method: str, batches: Any = None, family: str | None = None,
              progress: Callable[[str], None] | None = None) -> dict:
    """Apply `method` to `model` in place; returns what it chose (for the report)."""
    if method not in METHODS:
        raise ShrinkError(f"Unknown calibration '{method}'; choose one of: {', '.join(METHODS)}.")
    if method == "auto":  # AWQ where it is written: on the embedded Gemma its Q4_0 export had KL 0.157 where plain Q4_0 had 0.339
        method = "awq" if family in AWQ_FAMILIES and batches is not None else "mse"
    if method == "max":
        return {"method": "max"}
    if method == "mse":
        return {"method": "mse", "mean_clip_ratio": clip_to_mse(model, plan)}
    if batches is None:
        raise ShrinkError("AWQ needs calibration text to measure activations.")
    return {"method": "awq", "exponents": awq(model, plan, batches, family, progress)}


def _scale_groups(weight: Any, grid: str) -> Any:
    """View the weight as [groups, elements sharing one scale]."""
    from shrink.numformats.grids import scale_group_size

    size = scale_group_size(grid, tuple(weight.shape))
    return weight.reshape(-1, size)


def clip_to_mse(model: Any, plan: QuantPlan) -> float:
    """Per scale group, the clipping ratio with the least squared error; returns the mean ratio."""
    import torch

    from shrink.numformats.grids import quantize_dequantize

    chosen = []
    with torch.no_grad(), ProgressLines("MSE clipping", len(plan.tensors), "tensor") as lines:
        for tensor in plan.tensors:
            linear = model.get_submodule(tensor.module)
            weight = linear.weight.detach().float()
            groups = _scale_groups(weight, tensor.grid)
            limit = groups.abs().amax(dim=1, keepdim=True)
            best_error = torch.full((groups.shape[0],), float("inf"))
            best = groups.clone()
            best_ratio = torch.ones(groups.shape[0])
            for ratio in CLIP_RATIOS:
                clipped = torch.maximum(torch.minimum(groups, limit * ratio), -limit * ratio)
                error = (_qdq_groups(quantize_dequantize, clipped, weight.shape, tensor.grid) - groups).pow(2).sum(1)
                better = error < best_error
                best_error = torch.where(better, error, best_error)
                best[better] = clipped[better]
                best_ratio[better] = ratio
            linear.weight.copy_(best.reshape(weight.shape).to(linear.weight.dtype))
            chosen.append(best_ratio.mean())
            lines.advance()
    return float(torch.stack(chosen).mean())


def _qdq_groups(qdq: Callable, groups: Any, shape: tuple, grid: str) -> Any:
    return qdq(groups.reshape(shape), grid).reshape(groups.shape)


def _awq_groups(block: Any, family: str, shared_owners: set[int]) -> list[tuple[Any, list[Any], str]]:
    """(operation feeding the inputs, projections reading them, how to divide the scale out of it).
    K/V transforms (blockvariants.SharedKVAttention): a consumer of a shared cache has no K/V projections;
    an owner under SingleInputKV reads its K/V input from layer k's kv_norm (_kv_input_group), not from
    its own input norm; an owner whose values other layers read (`shared_owners`) keeps its v rows, which
    their o projections would otherwise see scaled."""
    attn, mlp = blocks.attention(block), blocks.mlp(block)
    if attn is None or mlp is None:
        return []
    ffn_norm = getattr(block, "pre_feedforward_layernorm", None) or block.post_attention_layernorm
    norm_kind = "gemma_norm" if family == "gemma3" else "norm"
    own_kv = [getattr(attn, n) for n in ("k_proj", "v_proj") if hasattr(attn, n) and not getattr(attn, "_kv_input", None)]
    groups = [(block.input_layernorm, [attn.q_proj, *own_kv], norm_kind)]
    gated = [mlp.gate_proj, mlp.up_proj] if hasattr(mlp, "gate_proj") else [mlp.up_proj]
    groups.append((ffn_norm, gated, norm_kind))
    if hasattr(mlp, "gate_proj"):
        groups.append((mlp.up_proj, [mlp.down_proj], "rows"))
    # without GQA, v's rows map one-to-one to o's inputs
    if hasattr(attn, "v_proj") and id(attn) not in shared_owners and attn.v_proj.out_features == attn.o_proj.in_features:
        groups.append((attn.v_proj, [attn.o_proj], "rows"))
    return groups


def _kv_input_group(model: Any, family: str) -> list[tuple[Any, list[Any], str]]:
    """SingleInputKV (compress/swiftkv.py): the K/V projections of every layer from k on read one norm,
    layer k's kv_norm; one group scales them all and divides the scales out of it."""
    attentions = [blocks.attention(block) for block in model.model.layers]
    readers = [a for a in attentions if a is not None and getattr(a, "_kv_input", None)]
    if not readers:
        return []
    projections = [getattr(a, n) for a in readers for n in ("k_proj", "v_proj")]
    return [(readers[0]._kv_input[0].kv_norm, projections, "gemma_norm" if family == "gemma3" else "norm")]


def awq(model: Any, plan: QuantPlan, batches: Any, family: str | None, progress: Callable[[str], None] | None = None,
        batch_size: int = 4) -> list[float]:
    """Search one scaling exponent per group of projections and fold the scales in; returns them."""
    import torch

    if family not in AWQ_FAMILIES:
        raise ShrinkError(f"AWQ is written for Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma 3), not '{family}'; "
                          "use --calibration mse.")
    names = {id(m): n for n, m in model.named_modules()}
    shared_owners = {id(m._source[0]) for m in model.modules() if getattr(m, "_source", None)}
    groups = [g for block in model.model.layers for g in _awq_groups(block, family, shared_owners)]
    work = [(feeder, [p for p in projections if plan.grid_of(names[id(p)])], kind)
            for feeder, projections, kind in groups + _kv_input_group(model, family)]
    work = [(feeder, projections, kind) for feeder, projections, kind in work if projections]
    inputs = _capture_inputs(model, [projections[0] for _, projections, _ in work], batches, batch_size)
    for _, projections, _ in work:
        if not bool(torch.isfinite(inputs[id(projections[0])]).all()):
            raise ShrinkError(f"Calibration activations entering {names[id(projections[0])]} are NaN or infinite, so AWQ "
                              "cannot scale it: the model overflows on this text or its weights are damaged.")
    exponents = []
    with torch.no_grad(), ProgressLines("AWQ search", len(work), "group") as lines:
        for n, (feeder, projections, kind) in enumerate(work):
            x = inputs[id(projections[0])]
            grids = [plan.grid_of(names[id(p)]) for p in projections]
            exponent, scales = _search_exponent(x, projections, grids)
            _fold(feeder, projections, scales, kind)
            exponents.append(exponent)
            lines.advance()
            if progress is not None:
                progress(f"AWQ {n + 1}/{len(work)}: {names[id(projections[0])]} exponent {exponent:.2f}")
    return exponents


def _capture_inputs(model: Any, projections: list[Any], batches: Any, batch_size: int) -> dict[int, Any]:
    """Up to AWQ_TOKENS input rows of every listed projection, from one full-precision pass."""
    import torch

    captured: dict[int, list[Any]] = {id(p): [] for p in projections}

    def hook(module, args):
        rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
        kept = sum(r.shape[0] for r in captured[id(module)])
        if kept < AWQ_TOKENS:
            captured[id(module)].append(rows[:AWQ_TOKENS - kept])

    handles = [p.register_forward_pre_hook(hook) for p in projections]
    needed = -(-AWQ_TOKENS // batches.shape[1])  # sequences that hold AWQ_TOKENS rows
    try:
        with torch.no_grad(), ProgressLines("AWQ activations", -(-min(needed, batches.shape[0]) // batch_size),
                                            "batch") as lines:
            for start in range(0, batches.shape[0], batch_size):
                if all(sum(r.shape[0] for r in rows) >= AWQ_TOKENS for rows in captured.values()):
                    break
                model(batches[start:start + batch_size])
                lines.advance()
    finally:
        for handle in handles:
            handle.remove()
    return {key: torch.cat(rows) for key, rows in captured.items()}


def _search_exponent(x: Any, projections: list[Any], grids: list[str]) -> tuple[float, Any]:
    import torch

    from shrink.numformats.grids import quantize_dequantize

    magnitude = x.abs().mean(0).clamp(min=1e-8)
    reference = [x @ p.weight.detach().float().T for p in projections]
    best = (float("inf"), 0.0, torch.ones_like(magnitude))
    for exponent in AWQ_EXPONENTS:
        scales = magnitude.pow(exponent)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centred, so neither side drifts in magnitude
        error = 0.0
        for p, grid, ref in zip(projections, grids, reference):
            quantized = quantize_dequantize(p.weight.detach().float() * scales, grid) / scales
            error += float((x @ quantized.T - ref).pow(2).mean())
        if error < best[0]:
            best = (error, exponent, scales)
    return best[1], best[2]


def _fold(feeder: Any, projections: list[Any], scales: Any, kind: str) -> None:
    """Multiply the projections' input columns by `scales` and divide them out of the feeder."""
    for p in projections:
        p.weight.mul_(scales.to(p.weight.dtype))
    if kind == "gemma_norm":  # Gemma's norm computes x * (1 + w)
        feeder.weight.copy_(((1 + feeder.weight.float()) / scales - 1).to(feeder.weight.dtype))
    elif kind == "norm":
        feeder.weight.div_(scales.to(feeder.weight.dtype))
    else:  # the previous projection's output rows
        feeder.weight.div_(scales.to(feeder.weight.dtype)[:, None])
        if feeder.bias is not None:
            feeder.bias.div_(scales.to(feeder.bias.dtype))
