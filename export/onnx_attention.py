"""The attention an ONNX export traces: grouped-query attention without copies of the KV cache.

transformers' eager and SDPA attention repeat each KV head for its query heads (`repeat_kv`) and
transpose the keys before the product. Traced into ONNX, that is an Expand, a Reshape and a Transpose
of the whole cache in every layer at every decoded token. On the embedded model's int4 graph (one KV head,
four query heads, 256 wide; 2 cores) a decode step took 32.3 ms after 128 cached positions and 67.7 ms
after 512; with this attention 24.9 and 27.8 ms (measured one after the other, session 11). Folding a KV
head's query heads into the rows of one product reads the cache as it is: MatMul(Q, K^T) takes K^T as a transposed operand (ONNX
Runtime fuses the Transpose into FusedMatMul) and nothing of the cache's size is written but the cache.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

NAME = "shrink_grouped"


def grouped_attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
                      scaling: float | None = None, softcap: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention interface: query (b, heads, q, d), key/value (b, kv_heads, kv, d), an additive
    mask (b, 1 or heads, q, >= kv); returns (b, q, heads, d) as eager attention does, without weights."""
    import torch

    if kwargs.get("s_aux") is not None:  # attention sinks (gpt-oss): left to transformers' own SDPA path
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      softcap=softcap, **kwargs)
    batch, heads, rows, width = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    groups = heads // kv_heads
    scale = width ** -0.5 if scaling is None else scaling
    # repeat_kv gives query head h the KV head h // groups: a KV head's query heads are consecutive
    scores = torch.matmul(query.reshape(batch, kv_heads, groups * rows, width), key.transpose(2, 3)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.reshape(batch, kv_heads, groups, rows, length)
    if attention_mask is not None:
        mask = attention_mask[..., :length]
        mask = mask.unsqueeze(2) if mask.shape[1] == 1 else mask.reshape(batch, kv_heads, groups, rows, length)
        scores = scores + mask
    weights = torch.nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights.reshape(batch, kv_heads, groups * rows, length), value)
    return out.reshape(batch, heads, rows, width).transpose(1, 2).contiguous(), None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(NAME, grouped_attention)
    AttentionMaskInterface.register(NAME, eager_mask)  # additive float masks, never skipped for causal


@contextlib.contextmanager
def traced_with_grouped_attention(model: Any) -> Iterator[None]:
    """Run `model` (and its sub-configs) with grouped_attention inside the block; its own implementation after."""
    _register()
    configs = list(_configs(model.config))
    before = [c._attn_implementation for c in configs]
    for config in configs:
        config._attn_implementation = NAME
    try:
        yield
    finally:
        for config, name in zip(configs, before):
            config._attn_implementation = name


def _configs(config: Any) -> Iterator[Any]:
    """A config and the sub-configs a multimodal or composite model reads its attention from."""
    yield config
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None and hasattr(sub, "_attn_implementation"):
            yield sub
