"""The torch modules of Puzzle's cheap block variants: a sub-block replaced by nothing or by one map.

Each stands in a decoder layer where the family's `self_attn` or `mlp` was, with the same call
signature, so the family's own decoder layer (its norms, residual adds) runs unchanged. A module's
`variant` attribute ("none" or "linear") is how families.py and layershapes.py recognise it without
importing torch. The linear maps keep the parent's projection names (`o_proj`, `down_proj`) because
that is the tensor they store in llama.cpp's `deci` layout (attn_output, ffn_down).
"""

from __future__ import annotations

from typing import Any

import torch


def _keep_positions(cache: Any, layer_idx: int | None, hidden_states: Any) -> None:
    """Record the new positions in this layer's cache slot with zero-width K and V, so a cache whose
    length is read from this layer (transformers reads layer 0) still counts the tokens seen."""
    if cache is None or layer_idx is None:
        return
    batch, seq = hidden_states.shape[:2]
    empty = hidden_states.new_zeros(batch, 1, seq, 0)
    cache.update(empty, empty, layer_idx)


class NoOpMixer(torch.nn.Module):
    variant = "none"

    def __init__(self, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states: Any, cache: Any = None, past_key_values: Any = None, **_: Any) -> tuple[Any, None]:
        _keep_positions(cache if cache is not None else past_key_values, self.layer_idx, hidden_states)
        return torch.zeros_like(hidden_states), None


class LinearMixer(torch.nn.Module):
    """Attention in which every token attends only to itself: the value and output projections
    collapse into one hidden x hidden map."""

    variant = "linear"

    def __init__(self, hidden: int, dtype: Any = None, layer_idx: int | None = None) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.o_proj = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype)

    def forward(self, hidden_states: Any, cache: Any = None, past_key_values: Any = None, **_: Any) -> tuple[Any, None]:
        # decoder layers pass the cache as `cache` (transformers 5.x) or `past_key_values` (before)
        _keep_positions(cache if cache is not None else past_key_values, self.layer_idx, hidden_states)
        return self.o_proj(hidden_states), None


class NoOpFFN(torch.nn.Module):
    variant = "none"

    def forward(self, hidden_states: Any) -> Any:
        return torch.zeros_like(hidden_states)


class LinearFFN(torch.nn.Module):
    variant = "linear"

    def __init__(self, hidden: int, dtype: Any = None) -> None:
        super().__init__()
        self.down_proj = torch.nn.Linear(hidden, hidden, bias=False, dtype=dtype)

    def forward(self, hidden_states: Any) -> Any:
        return self.down_proj(hidden_states)


def mixer_variant(kind: str, hidden: int, dtype: Any, layer_idx: int | None) -> torch.nn.Module:
    return NoOpMixer(layer_idx) if kind == "none" else LinearMixer(hidden, dtype, layer_idx)


def ffn_variant(kind: str, hidden: int, dtype: Any) -> torch.nn.Module:
    return NoOpFFN() if kind == "none" else LinearFFN(hidden, dtype)
