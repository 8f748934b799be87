"""The torch modules of Puzzle's cheap block variants: a sub-block replaced by nothing or by one map.

Each stands in a decoder layer where the family's `self_attn` or `mlp` was, with the same call
signature, so the family's own decoder layer (its norms, residual adds) runs unchanged. A module's
`variant` attribute ("none" or "linear") is how families.py and layershapes.py recognise it without
importing torch. The linear maps keep the parent's projection names (`o_proj`, `down_proj`) because
that is the tensor they store in llama.cpp's `deci` layout (attn_output, ffn_down).
"""

from __future__ import annotations

import contextlib
import copy
import sys
from collections.abc import Iterator
from typing import Any

import torch


def _keep_positions(cache: Any, layer_idx: int | None, hidden_states: Any) -> None:
    """Record the new positions in this layer's cache slot with one-wide K and V (4 bytes a token), so a
    cache whose length is read from this layer (transformers reads layer 0) still counts the tokens
    seen; zero-wide tensors would not do: an empty cache layer reports length 0. `hidden_states` is any
    tensor shaped (batch, new positions, ...)."""
    if cache is None or layer_idx is None:
        return
    batch, seq = hidden_states.shape[:2]
    marker = hidden_states.new_zeros(batch, 1, seq, 1)
    cache.update(marker, marker, layer_idx)


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


class Mamba2Mixer(torch.nn.Module):
    """A Mamba2 mixer (GraniteMoeHybrid's) standing where a decoder layer's attention was, called as the
    attention is; it keeps no cache here (Puzzle trains and scores it on whole sequences, and the chosen
    model is rebuilt as a GraniteMoeHybrid, whose layers hold their recurrent state)."""

    variant = "mamba2"

    def __init__(self, mamba: torch.nn.Module) -> None:
        super().__init__()
        self.mamba = mamba

    def forward(self, hidden_states: Any, **_: Any) -> tuple[Any, None]:
        return self.mamba(hidden_states), None


def mixer_variant(kind: str, hidden: int, dtype: Any, layer_idx: int | None) -> torch.nn.Module:
    return NoOpMixer(layer_idx) if kind == "none" else LinearMixer(hidden, dtype, layer_idx)


def ffn_variant(kind: str, hidden: int, dtype: Any) -> torch.nn.Module:
    return NoOpFFN() if kind == "none" else LinearFFN(hidden, dtype)


class SharedKVAttention(torch.nn.Module):
    """Attention whose keys and values may come from another layer (cross-layer KV sharing, CLA).

    It takes over a family's attention module: the same projection modules under the same names (so
    a checkpoint's tensor names do not change), the family's own RoPE and attention kernels. An owner
    computes K and V, updates its cache and leaves the result (past and new positions, after RoPE) on
    itself for this forward; a consumer (`kv_source` set) has no K/V projections and attends to what
    its source left. Sources run before their consumers (a lower layer index), so the keys are there.
    """

    def __init__(self, parent: torch.nn.Module, source: SharedKVAttention | None = None) -> None:
        super().__init__()
        if isinstance(parent, SharedKVAttention):  # sharing a layer that already reads its K/V input elsewhere
            self._rope, self._eager = parent._rope, parent._eager
        else:
            family = sys.modules[type(parent).__module__]
            self._rope, self._eager = family.apply_rotary_pos_emb, family.eager_attention_forward
        for name in ("config", "layer_idx", "head_dim", "scaling", "attention_dropout", "is_causal",
                     "num_key_value_groups", "sliding_window"):
            if hasattr(parent, name):
                setattr(self, name, getattr(parent, name))
        names = ("q_proj", "o_proj", "q_norm") if source is not None else ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")
        for name in names:
            if hasattr(parent, name):
                setattr(self, name, getattr(parent, name))
        # a plain list: the source is another layer's module, not a submodule of this one
        self._source = [source] if source is not None else []
        self.kv_source = source.layer_idx if source is not None else None
        self.shared = None  # (keys, values) of the current forward, for consumers
        # (cos, sin) of every new position while only the last one runs this layer (last_token_prefill)
        self.kv_rope = None
        # SingleInputKV: the norm whose output an owner projects to K and V instead of its own input
        self._kv_input = list(getattr(parent, "_kv_input", []))

    def __getstate__(self) -> dict:
        # this forward's keys may carry autograd history, which copies and pickles must not hold
        return {**self.__dict__, "shared": None, "kv_rope": None}

    @property
    def num_kv_heads(self) -> int:
        owner = self._source[0] if self._source else self
        return owner.k_proj.out_features // self.head_dim

    def forward(self, hidden_states: Any, position_embeddings: Any = None, attention_mask: Any = None,
                cache: Any = None, past_key_values: Any = None, **kwargs: Any) -> tuple[Any, Any]:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        cache = cache if cache is not None else past_key_values
        shape = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = self.q_proj(hidden_states).view(shape).transpose(1, 2)
        if hasattr(self, "q_norm"):
            query = self.q_norm(query)
        # Nemotron-H's attention has no RoPE: its blocks pass no position embeddings
        cos, sin = position_embeddings if position_embeddings is not None else (None, None)
        if self._source:
            if cos is not None:
                query, _ = self._rope(query, query, cos, sin)
            key, value = self._source[0].shared
            # without storing the source's K/V again; as many positions as the source got
            _keep_positions(cache, self.layer_idx, hidden_states if self.kv_rope is None else self.kv_rope[0])
        else:
            kv_states = self._kv_input[0].kv_input if self._kv_input else hidden_states
            kv_shape = (*kv_states.shape[:-1], -1, self.head_dim)
            key = self.k_proj(kv_states).view(kv_shape).transpose(1, 2)
            value = self.v_proj(kv_states).view(kv_shape).transpose(1, 2)
            if hasattr(self, "k_norm"):
                key = self.k_norm(key)
            if cos is not None and self.kv_rope is None:
                query, key = self._rope(query, key, cos, sin)
            elif cos is not None:  # the query is the last position only, the keys every new position
                query, _ = self._rope(query, query, cos, sin)
                key, _ = self._rope(key, key, *self.kv_rope)
            if cache is not None:
                key, value = cache.update(key, value, self.layer_idx, kwargs=kwargs)
            self.shared = (key, value)
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self._eager)
        extra = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
        out, weights = attention(self, query, key, value, attention_mask,
                                 dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling,
                                 **extra, **kwargs)
        return self.o_proj(out.reshape(*hidden_states.shape[:-1], -1).contiguous()), weights


class SingleInputKVNorm(torch.nn.Module):
    """Layer k's input norm under SwiftKV's SingleInputKV (arXiv 2410.03960): it normalises the residual
    stream entering layer k as before (`weight`, the checkpoint name unchanged) and also through
    `kv_norm`, a norm of the family's own class, whose output the attention layers from k on project
    to their keys and values (their `_kv_input`). So the prompt's K/V of every layer >= k exist once
    layer k's input does, and only the last prompt token needs the layers from k on."""

    def __init__(self, parent: torch.nn.Module, layer_idx: int) -> None:
        super().__init__()
        self.weight = parent.weight
        self.kv_norm = copy.deepcopy(parent)
        self.single_input_kv = layer_idx  # how families.py recognises it without importing torch
        self.kv_input = None  # kv_norm's output of the current forward
        self.pinned_kv_input = None  # set by last_token_prefill: kv_norm of every new position, used once

    def __getstate__(self) -> dict:
        return {**self.__dict__, "kv_input": None, "pinned_kv_input": None}  # no autograd history in copies

    def forward(self, hidden_states: Any) -> Any:
        pinned, self.pinned_kv_input = self.pinned_kv_input, None
        self.kv_input = pinned if pinned is not None else self.kv_norm(hidden_states)
        # the family's norm (its own convention, Gemma's 1 + w included) with layer k's weight
        return torch.func.functional_call(self.kv_norm, {"weight": self.weight}, (hidden_states,))


def install_single_input_kv(model: torch.nn.Module, k: int) -> SingleInputKVNorm:
    """Make every attention layer from `k` on read its K/V input from a norm of layer k's input
    (SingleInputKV); the norm starts as layer k's input norm, the projections stay each layer's own.
    Layers that share another layer's cache (consumers) compute no K/V and are left as they are."""
    layers = model.model.layers
    norm = SingleInputKVNorm(layers[k].input_layernorm, k)
    layers[k].input_layernorm = norm
    for block in layers[k:]:
        attention = block.self_attn
        if getattr(attention, "kv_source", None) is not None:
            continue
        if not isinstance(attention, SharedKVAttention):
            attention = block.self_attn = SharedKVAttention(attention)
        attention._kv_input = [norm]
    return norm


def single_input_kv_layer(model: torch.nn.Module) -> int | None:
    """k of a SingleInputKV model (the layer whose input norm feeds every later layer's K/V), else None."""
    return next((i for i, block in enumerate(model.model.layers) if hasattr(block.input_layernorm, "kv_norm")), None)


def _last_position(kwargs: dict) -> dict:
    """A decoder layer's keyword arguments for the last new position only: its RoPE angles, its row of the
    attention mask (a 4-d tensor; None stays None: no mask means every key is visible to the last query)
    and its position id."""
    out = dict(kwargs)
    if out.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(t[:, -1:] for t in out["position_embeddings"])
    mask = out.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4:
        out["attention_mask"] = mask[:, :, -1:, :]
    if isinstance(out.get("position_ids"), torch.Tensor):
        out["position_ids"] = out["position_ids"][:, -1:]
    return out


@contextlib.contextmanager
def last_token_prefill(model: torch.nn.Module) -> Iterator[int | None]:
    """SwiftKV's prefill schedule for a SingleInputKV model: while active, the layers from k on run the last
    new token only (their keys and values still come from every new position's kv_norm of layer k's
    input), so the prompt's other tokens stop at layer k. Outputs cover the last position; the cache
    holds every position of every layer, as a full forward leaves it. A model without SingleInputKV runs
    unchanged. Yields k (or None)."""
    layers = model.model.layers
    k = single_input_kv_layer(model)
    if k is None:
        yield None
        return
    norm = layers[k].input_layernorm

    def last_only(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        if block is layers[k]:
            norm.pinned_kv_input = norm.kv_norm(hidden)
        attention = getattr(block, "self_attn", None)
        if isinstance(attention, SharedKVAttention):
            attention.kv_rope = kwargs.get("position_embeddings")
        return (hidden[:, -1:], *args[1:]), _last_position(kwargs)

    handles = [layers[i].register_forward_pre_hook(last_only, with_kwargs=True) for i in range(k, len(layers))]
    try:
        yield k
    finally:
        for handle in handles:
            handle.remove()
        norm.pinned_kv_input = None
        for block in layers[k:]:
            if isinstance(getattr(block, "self_attn", None), SharedKVAttention):
                block.self_attn.kv_rope = None
