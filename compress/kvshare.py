"""Cross-layer KV sharing (CLA, arXiv 2405.12981; SwiftKV's AcrossKV, arXiv 2410.03960): groups of layers
share one KV cache. The group's first layer owns it (computes K and V); the others compute only their
queries and attend to the owner's keys and values, so they store no cache and hold no K/V projections.

Groups are runs of consecutive layers of the same attention kind (the same sliding window and RoPE:
Gemma 3's local layers share with local layers, its global layers with global ones), so a consumer's
queries meet keys rotated the way its own would be. Which runs share is chosen by how alike their keys
and values are on calibration text (mean cosine similarity, measured); the owner's projections start
as the mean of the group's (AcrossKV), then distillation recovers what sharing lost.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from shrink import blocks
from shrink.archspec import AttentionSpec
from shrink.errors import ShrinkError
from shrink.families import spec_from_model

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "nemotron_h")


def _kind(layer: Any) -> tuple:
    a = layer.mixer
    return (a.sliding_window, a.num_kv_heads, a.head_dim)


def runs_of_kind(spec: Any) -> list[list[int]]:
    """The attention layers grouped by kind, each in layer order (the layers a group may draw from)."""
    kinds: dict[tuple, list[int]] = {}
    for i, layer in enumerate(spec.layers):
        if isinstance(layer.mixer, AttentionSpec) and layer.mixer.owns_kv:
            kinds.setdefault(_kind(layer), []).append(i)
    return list(kinds.values())


def check(spec: Any, groups: list[list[int]]) -> None:
    if spec.family not in SUPPORTED_FAMILIES:
        raise ShrinkError(f"KV sharing is written for {', '.join(SUPPORTED_FAMILIES)}, not '{spec.family}'.")
    seen: set[int] = set()
    for group in groups:
        layers = [spec.layers[i] if 0 <= i < spec.num_layers else None for i in group]
        if len(group) < 2 or any(layer is None or not isinstance(layer.mixer, AttentionSpec) for layer in layers):
            raise ShrinkError(f"A KV-sharing group is two or more attention layers of the model; got {group}.")
        if seen & set(group):
            raise ShrinkError(f"Layer(s) {sorted(seen & set(group))} appear in two KV-sharing groups.")
        seen |= set(group)
        if len({_kind(layer) for layer in layers}) > 1:
            raise ShrinkError(f"Layers {group} differ in sliding window or KV heads, so they cannot share one cache.")
        if group != sorted(group):
            raise ShrinkError(f"A KV-sharing group lists its layers in order (the first owns the cache); got {group}.")


def key_value_similarity(loaded: Any, sequences: Any, batch_size: int = 4) -> dict[tuple[int, int], float]:
    """Mean cosine similarity of the keys and of the values (per token and KV head, before RoPE) of every
    two consecutive layers of the same kind, measured on `sequences`."""
    import torch

    model = loaded.model.eval()
    outputs: dict[tuple[int, str], Any] = {}
    handles = []
    for i, block in enumerate(model.model.layers):
        attn = blocks.attention(block)
        if attn is None:  # a Nemotron-H Mamba or MLP block
            continue
        for name in ("k_proj", "v_proj"):
            handles.append(getattr(attn, name).register_forward_hook(
                lambda _m, _a, out, key=(i, name): outputs.__setitem__(key, out.detach())))
    pairs = [(a, b) for run in runs_of_kind(loaded.spec) for a, b in zip(run, run[1:])]
    totals = {pair: 0.0 for pair in pairs}
    count = 0
    try:
        with torch.no_grad():
            for start in range(0, sequences.shape[0], batch_size):
                model(sequences[start:start + batch_size], use_cache=False)
                d = loaded.spec.layers[pairs[0][0]].mixer.head_dim if pairs else 1
                for a, b in pairs:
                    for name in ("k_proj", "v_proj"):
                        x, y = outputs[(a, name)].unflatten(-1, (-1, d)), outputs[(b, name)].unflatten(-1, (-1, d))
                        totals[(a, b)] += float(torch.nn.functional.cosine_similarity(x, y, dim=-1).sum()) / 2
                first = outputs[(pairs[0][0], "k_proj")] if pairs else None
                count += first.shape[0] * first.shape[1] * (first.shape[2] // d) if pairs else 0
    finally:
        for handle in handles:
            handle.remove()
    return {pair: total / max(count, 1) for pair, total in totals.items()}


def choose_pairs(spec: Any, similarity: dict[tuple[int, int], float], count: int | None = None) -> list[list[int]]:
    """Up to `count` disjoint pairs of consecutive same-kind layers (default: as many as fit), the most
    alike first; within a run, a dynamic program over the chain picks the best disjoint set."""
    chosen: list[tuple[float, tuple[int, int]]] = []
    for run in runs_of_kind(spec):
        best: list[tuple[float, list]] = [(0.0, []), (0.0, [])]  # best over the first k layers of the run
        for k in range(2, len(run) + 1):
            pair = (run[k - 2], run[k - 1])
            take = (best[k - 2][0] + similarity[pair] + 1.0, best[k - 2][1] + [pair])  # +1: prefer more pairs
            best.append(max(best[k - 1], take, key=lambda option: option[0]))
        chosen += [(similarity[pair], pair) for pair in best[-1][1]]
    chosen.sort(reverse=True)
    if count is not None:
        if count > len(chosen):
            raise ShrinkError(f"Only {len(chosen)} pairs of consecutive same-kind attention layers can share a cache; "
                              f"{count} were asked for.")
        chosen = chosen[:count]
    return sorted([list(pair) for _, pair in chosen])


def every_pair(spec: Any) -> list[list[int]]:
    """As many disjoint pairs as fit, chosen without text (every pair alike): how many layers can share,
    which the cost depends on, whichever pairs the measured similarity later prefers."""
    pairs = [(a, b) for run in runs_of_kind(spec) for a, b in zip(run, run[1:])]
    return choose_pairs(spec, dict.fromkeys(pairs, 0.0))


def shared_spec(spec: Any, groups: list[list[int]]) -> Any:
    """The ArchSpec share_kv's model has, from the spec alone (the planner costs sharing before any
    weight moves): each group's later layers read the first one's cache."""
    check(spec, groups)
    layers = list(spec.layers)
    for group in groups:
        for i in group[1:]:
            layers[i] = replace(layers[i], mixer=replace(layers[i].mixer, kv_source=group[0]))
    return replace(spec, layers=type(spec.layers)(layers))


def share_kv(loaded: Any, groups: list[list[int]], init: str = "mean") -> Any:
    """A copy of the model whose `groups` share one KV cache each (the first layer of a group owns it);
    `init` mean: the owner's K/V projections (and key norm) start as the group's mean (AcrossKV);
    owner: they stay the owner's own."""
    import torch

    from shrink.blockvariants import SharedKVAttention

    check(loaded.spec, groups)
    if init not in ("mean", "owner"):
        raise ShrinkError(f"KV-sharing initialisation is 'mean' or 'owner', not '{init}'.")
    model = copy.deepcopy(loaded.model)
    layers = model.model.layers
    for group in groups:
        attentions = [blocks.attention(layers[i]) for i in group]
        owner = attentions[0]
        if init == "mean":
            with torch.no_grad():
                for name in ("k_proj", "v_proj", "k_norm"):
                    if hasattr(owner, name):
                        for param_name, param in getattr(owner, name).named_parameters():
                            stacked = torch.stack([dict(getattr(a, name).named_parameters())[param_name] for a in attentions])
                            param.copy_(stacked.mean(0))
        shared = SharedKVAttention(owner)
        blocks.set_attention(layers[group[0]], shared)
        for i, attn in zip(group[1:], attentions[1:]):
            blocks.set_attention(layers[i], SharedKVAttention(attn, shared))
    spec = replace(spec_from_model(model), formats=loaded.spec.formats,
                   name=f"{loaded.spec.name}-kv{sum(len(g) - 1 for g in groups)}shared")
    return replace(loaded, model=model.eval(), spec=spec)
