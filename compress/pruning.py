"""Pruning a loaded model to explicit sizes or to a budget: what `shrink prune` and the recipe's
prune step share (the CLI adds only the tables and the progress)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Callable

from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.prune import prune_ffn, prune_heads, prune_hidden, prune_kv_groups, prune_layers, prune_ssm
from shrink.compress.search import apply, default_plan, feasible, rank_by_proxy, shortlist


def prune_to_sizes(loaded: Any, importance: Any, ffn=None, heads=None, kv_groups=None, hidden=None, layers=None,
                   ssm_heads=None, ssm_head_dim=None) -> Any:
    pruned = loaded
    if ssm_heads is not None or ssm_head_dim is not None:
        pruned = prune_ssm(pruned, importance, heads_per_group=ssm_heads, head_dim=ssm_head_dim)
    if ffn is not None:
        pruned = prune_ffn(pruned, importance, ffn)
    if kv_groups is not None:
        pruned = prune_kv_groups(pruned, importance, kv_groups)
    if heads is not None:
        pruned = prune_heads(pruned, importance, heads)
    if hidden is not None:
        pruned = prune_hidden(pruned, importance, hidden)
    if layers is not None:  # last: the importance scores are indexed by the original layers
        pruned = prune_layers(pruned, importance, layers)
    return pruned


RULE = "rule (layers and heads kept where the budget allows, FFN and hidden cuts as even as it allows)"


def budget_shape(spec: Any, importance: Any, budget: Any, axis: str, weights: str | None = None) -> tuple[Any, list]:
    """The shape the fixed rule picks for a budget, and every feasible candidate (largest first)."""
    return ranked_shape(spec, importance.layers.argsort(descending=True).tolist(), budget, axis, weights)


def ranked_shape(spec: Any, ranking: list[int], budget: Any, axis: str, weights: str | None = None) -> tuple[Any, list]:
    """budget_shape for a given layer ranking (most important first): the sizes follow from the spec
    and the budget alone, the ranking only says which layers a depth cut keeps."""
    costed = spec.with_formats(weights=weights, embeddings=weights) if weights else spec
    plans = feasible(costed, ranking, axis, budget)
    return default_plan(plans, costed), plans


def prune_to_budget(loaded: Any, importance: Any, split: Any, budget: Any, axis: str, search: bool = False,
                    candidates: int = 4, proxy_steps: int = 8, weights: str | None = None,
                    status: Callable[[str], None] = lambda message: None) -> tuple[Any, dict]:
    """Prune to the budget: by the fixed rule, or (search) by the lowest KL after a short distillation."""
    plan, plans = budget_shape(loaded.spec, importance, budget, axis, weights)
    report = {"non_embedding_before": loaded.spec.param_counts().non_embedding, "feasible_candidates": len(plans)}
    if not search:
        report.update(chosen=plan.to_dict(), chosen_by=RULE)
        return apply(plan, loaded, importance), report

    listed = shortlist(plans, candidates)
    status("Caching the teacher's top-k logits")
    train_topk = teacher_topk(loaded.model, split.train)
    eval_topk = teacher_topk(loaded.model, split.evaluation)
    status(f"Distilling {len(listed)} candidates for {proxy_steps} steps each")
    with tempfile.TemporaryDirectory(prefix="shrink-search-") as workdir:
        results = rank_by_proxy(listed, loaded, importance, split, train_topk, eval_topk, proxy_steps, 4,
                                Path(workdir), on_result=lambda r: status(
                                    f"{r.plan.label}: KL {r.kl_pruned:.3f} -> {r.kl_proxy:.3f}"))
    best = results[0]
    report.update(candidates=[r.to_dict() for r in results], chosen=best.plan.to_dict(),
                  chosen_by=f"distillation proxy ({best.tokens:,} tokens each, lowest held-out KL)")
    return apply(best.plan, loaded, importance), report
