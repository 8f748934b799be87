"""Choosing what to prune: candidate architectures under a parameter, memory or latency budget.

A candidate is a uniform Minitron shape: one FFN width, one query-head count per KV group, one
hidden size and a layer count (the layers kept are the most important ones). Its ArchSpec is worked
out without touching weights, so a grid of thousands is cheap to filter: a parameter budget (a
fraction of the non-embedding parameters), a memory budget (weights + KV cache + SSM state at the
workload, estimated) and an estimated decode latency on a hardware profile (roofline). The
feasible candidates closest to the budget are then either taken by a fixed rule (`default_plan`) or
ranked by a short distillation proxy (`rank_by_proxy`): prune, distil a few steps, measure held-out
KL to the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from shrink.archspec import ArchSpec, AttentionSpec
from shrink.compress.prune import prune_ffn, prune_heads, prune_hidden, prune_layers
from shrink.errors import ShrinkError
from shrink.hardware.roofline import Workload, estimate, memory_needed

AXES = ("width", "depth", "both")
FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25)  # of the FFN width
HIDDEN_FRACTIONS = (1.0, 0.875, 0.75, 0.625, 0.5)  # below half the residual stream loses too much


@dataclass(frozen=True)
class Budget:
    params: float | None = None  # fraction of the non-embedding parameters to keep
    memory_bytes: float | None = None  # weights + KV cache + SSM state, estimated at the workload
    latency_s: float | None = None  # estimated decode time per token on `profile`
    profile: Any = None
    workload: Any = None

    def __post_init__(self) -> None:
        if self.params is None and self.memory_bytes is None and self.latency_s is None:
            raise ShrinkError("Give a budget: --params, --memory or --budget (with --target).")
        if self.params is not None and not 0 < self.params <= 1:
            raise ShrinkError(f"--params is the fraction of non-embedding parameters to keep, between 0 and 1; got {self.params}.")
        if self.latency_s is not None and self.profile is None:
            raise ShrinkError("A latency budget needs a --target to estimate the latency on.")


@dataclass(frozen=True)
class Plan:
    ffn: int
    heads_per_group: int
    hidden: int
    kept_layers: tuple[int, ...]
    spec: ArchSpec
    figures: dict = field(default_factory=dict, compare=False)  # params, memory, latency: estimated

    @property
    def label(self) -> str:
        return f"ffn {self.ffn}, heads/group {self.heads_per_group}, hidden {self.hidden}, layers {len(self.kept_layers)}"

    def to_dict(self) -> dict:
        return {"ffn": self.ffn, "heads_per_group": self.heads_per_group, "hidden": self.hidden,
                "layers": len(self.kept_layers), "kept_layers": list(self.kept_layers), **self.figures}


def round_width(value: float, full: int) -> int:
    """A pruned width near `value` out of `full`: what Minitron's shapes and Puzzle's narrow FFNs keep."""
    quantum = 32 if full >= 256 else 4  # multiples of 32 keep kernels and quant blocks happy
    return max(quantum, int(round(value / quantum)) * quantum) if full >= quantum else full


def shaped(spec: ArchSpec, ffn: int, heads_per_group: int, hidden: int, kept_layers: tuple[int, ...]) -> ArchSpec:
    """The ArchSpec of `spec` pruned to this uniform shape (MoE experts and SSM mixers keep their widths)."""
    layers = []
    for i in kept_layers:
        layer = spec.layers[i]
        mixer, ffn_spec = layer.mixer, layer.ffn
        if isinstance(mixer, AttentionSpec):
            mixer = replace(mixer, num_heads=heads_per_group * mixer.num_kv_heads)
        if ffn_spec is not None and not ffn_spec.is_moe:
            ffn_spec = replace(ffn_spec, width=ffn)
        layers.append(replace(layer, mixer=mixer, ffn=ffn_spec))
    return replace(spec, layers=tuple(layers), hidden_size=hidden)


def _dense_widths(spec: ArchSpec) -> tuple[int, int]:
    ffn = [layer.ffn.width for layer in spec.layers if layer.ffn is not None and not layer.ffn.is_moe]
    attention = [layer.mixer for layer in spec.layers if isinstance(layer.mixer, AttentionSpec)]
    if not spec.is_uniform or len(set(ffn)) > 1 or len({a.num_heads // a.num_kv_heads for a in attention}) > 1:
        raise ShrinkError("Searching prune targets needs a uniform model (the same widths in every layer).")
    return (ffn[0] if ffn else 0), (attention[0].num_heads // attention[0].num_kv_heads if attention else 0)


def check_axis(axis: str) -> None:
    """An unknown --axis fails here: callers check it before the calibration text and importance are computed."""
    if axis not in AXES:
        raise ShrinkError(f"--axis must be one of {', '.join(AXES)}, not '{axis}'.")


def grid(spec: ArchSpec, layer_ranking: list[int], axis: str) -> list[tuple[int, int, int, tuple[int, ...]]]:
    """Every (ffn, heads per group, hidden, kept layers) shape on `axis`; layer_ranking is most important first."""
    check_axis(axis)
    ffn, group = _dense_widths(spec)
    width = axis in ("width", "both")
    ffns = sorted({round_width(ffn * f, ffn) for f in FRACTIONS}) if width and ffn else [ffn]
    heads = list(range(1, group + 1)) if width and group else [group]
    hiddens = sorted({round_width(spec.hidden_size * f, spec.hidden_size) for f in HIDDEN_FRACTIONS}) if width else [spec.hidden_size]
    total = spec.num_layers
    counts = range(1, total + 1) if axis == "depth" else range(max(1, total // 2), total + 1) if axis == "both" else [total]
    return [(f, h, d, tuple(sorted(layer_ranking[:n]))) for f in ffns for h in heads for d in hiddens for n in counts]


def _figures(spec: ArchSpec, budget: Budget) -> dict:
    workload = budget.workload or Workload()
    figures = {"params": spec.param_counts().total, "non_embedding_params": spec.param_counts().non_embedding}
    if budget.memory_bytes is not None:
        weights, kv, state, _ = memory_needed(spec, workload)
        figures["memory_bytes_estimated"] = weights + kv + state
    if budget.profile is not None:
        # The roofline's per-token decode time is linear in the context, so the middle of the
        # generation gives the average at a fraction of the cost of every step.
        middle = replace(workload, prompt_len=workload.prompt_len + workload.gen_len // 2, gen_len=1)
        figures["decode_s_estimated"] = estimate(spec, budget.profile, middle).tpot_s
    return figures


def feasible(spec: ArchSpec, layer_ranking: list[int], axis: str, budget: Budget) -> list[Plan]:
    """Candidates meeting the budget, the largest (closest to the budget) first."""
    limit = budget.params * spec.param_counts().non_embedding if budget.params is not None else None
    plans = []
    for ffn, heads, hidden, kept in grid(spec, layer_ranking, axis):
        candidate = shaped(spec, ffn, heads, hidden, kept)
        if limit is not None and candidate.param_counts().non_embedding > limit:
            continue
        figures = _figures(candidate, budget)
        if budget.memory_bytes is not None and figures["memory_bytes_estimated"] > budget.memory_bytes:
            continue
        if budget.latency_s is not None and figures["decode_s_estimated"] > budget.latency_s:
            continue
        plans.append(Plan(ffn, heads, hidden, kept, candidate, figures))
    if not plans:
        raise ShrinkError(f"No {axis} pruning of this model meets the budget; the smallest candidate on this axis "
                          "is still too large (try --axis both, or a larger budget).")
    return sorted(plans, key=lambda p: -p.figures["non_embedding_params"])


def _balance(plan: Plan, spec: ArchSpec) -> tuple:
    ffn, group = _dense_widths(spec)
    shares = [plan.hidden / spec.hidden_size] + ([plan.ffn / ffn] if ffn else [])
    # Minitron: prune width before depth, and keep attention heads when the budget allows
    return (len(plan.kept_layers) < spec.num_layers, plan.heads_per_group < group, round(max(shares) - min(shares), 3))


def default_plan(plans: list[Plan], spec: ArchSpec, slack: float = 0.03) -> Plan:
    """Without a search: among candidates within `slack` of the largest feasible size, the one that
    keeps every layer and head if it can, with the FFN and hidden sizes cut by the most similar
    fractions."""
    top = plans[0].figures["non_embedding_params"]
    near = [p for p in plans if p.figures["non_embedding_params"] >= (1 - slack) * top]
    return min(near, key=lambda p: (_balance(p, spec), -p.figures["non_embedding_params"]))


def shortlist(plans: list[Plan], count: int, slack: float = 0.05) -> list[Plan]:
    """Diverse candidates for the proxy: the largest feasible plan per (layers, heads) pair, within
    `slack` of the largest overall, so depth and head counts compete with FFN and hidden sizes."""
    top = plans[0].figures["non_embedding_params"]
    best: dict[tuple[int, int], Plan] = {}
    for plan in plans:
        if plan.figures["non_embedding_params"] >= (1 - slack) * top:
            best.setdefault((len(plan.kept_layers), plan.heads_per_group), plan)
    return sorted(best.values(), key=lambda p: -p.figures["non_embedding_params"])[:count]


def apply(plan: Plan, loaded: Any, importance: Any) -> Any:
    """Prune `loaded` to the plan's shape (each axis only when it changes)."""
    spec = loaded.spec
    ffn, group = _dense_widths(spec)
    pruned = loaded
    if ffn and plan.ffn != ffn:
        pruned = prune_ffn(pruned, importance, plan.ffn)
    if group and plan.heads_per_group != group:
        pruned = prune_heads(pruned, importance, plan.heads_per_group)
    if plan.hidden != spec.hidden_size:
        pruned = prune_hidden(pruned, importance, plan.hidden)
    if len(plan.kept_layers) != spec.num_layers:
        pruned = prune_layers(pruned, importance, len(plan.kept_layers))
    return pruned


@dataclass
class ProxyResult:
    plan: Plan
    kl_pruned: float  # held-out KL to the teacher right after pruning, measured
    kl_proxy: float  # after the short distillation, measured
    tokens: int

    def to_dict(self) -> dict:
        return {**self.plan.to_dict(), "kl_pruned": self.kl_pruned, "kl_after_proxy": self.kl_proxy,
                "proxy_tokens": self.tokens}


def recovered_kl(model: Any, split: Any, train_topk: Any, eval_topk: Any, steps: int, batch_size: int,
                 workdir: Any) -> tuple[float, float, int]:
    """(held-out KL to the teacher before, after `steps` of distillation, tokens trained): how well a
    changed model recovers, the proxy every architecture the planner weighs is ranked by."""
    from shrink.compress.distill.evaluate import evaluate
    from shrink.compress.distill.trainer import DistillConfig, distill

    before = evaluate(model, split.evaluation, *eval_topk).kl
    config = DistillConfig(steps=steps, batch_size=batch_size, checkpoint_every=10 ** 9, warmup_steps=0)
    report = distill(model, split.train, train_topk, config, workdir, split.evaluation, eval_topk)
    return before, report.eval_after["kl"], report.tokens


def rank_by_proxy(plans: list[Plan], loaded: Any, importance: Any, split: Any, train_topk: Any, eval_topk: Any,
                  steps: int, batch_size: int, workdir: Any, on_result: Any = None) -> list[ProxyResult]:
    """Prune to each plan, distil `steps` steps, and rank by held-out KL to the teacher (lowest first)."""
    results = []
    for i, plan in enumerate(plans):
        pruned = apply(plan, loaded, importance)
        result = ProxyResult(plan, *recovered_kl(pruned.model, split, train_topk, eval_topk, steps, batch_size,
                                                 workdir / f"candidate-{i}"))
        results.append(result)
        if on_result is not None:
            on_result(result)
        del pruned
    return sorted(results, key=lambda r: r.kl_proxy)
