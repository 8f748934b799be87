"""SwiftKV's SingleInputKV (arXiv 2410.03960; Snowflake ArcticTraining projects/swiftkv): every attention
layer from index k on computes its keys and values from one norm of layer k's input (the residual
stream entering layer k) through its own K/V projections, instead of from its own input. A prompt's
keys and values for all layers are then known once layer k's input is, so prefill runs the prompt
through the first k layers and only the last prompt token through the rest (hardware/ops.py costs
that schedule); decoding and the KV cache are unchanged.

Initialisation as SwiftKV's: the new norm copies layer k's input norm (Gemma 3's zero-centred weight
included, being a copy of the family's own module), the K/V projections (and Gemma 3 / Qwen3's per-head
key norm) stay each layer's own, so only what feeds them changes. Its first training stage moves the
new norm and the queries, keys and values of the layers from k on (SwiftKV copies q_proj into a trained
q_proj_swiftkv); everything else stays frozen, and the teacher is the untransformed model.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from typing import Any

from shrink import blocks
from shrink.errors import ShrinkError
from shrink.families import spec_from_model

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
# per layer from k on, the modules stage one trains (those a layer has); `queries` adds q_proj and q_norm
KV_MODULES = ("k_proj", "v_proj", "k_norm")
QUERY_MODULES = ("q_proj", "q_norm")


def check(spec: Any, k: int) -> None:
    if spec.family not in SUPPORTED_FAMILIES:
        raise ShrinkError(f"SingleInputKV is written for {', '.join(SUPPORTED_FAMILIES)}, not '{spec.family}'.")
    if spec.single_input_kv is not None:
        raise ShrinkError(f"The model already takes its K/V from layer {spec.single_input_kv}'s input (SingleInputKV).")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < spec.num_layers:
        raise ShrinkError(f"SingleInputKV's k is a layer index from 1 to {spec.num_layers - 1}, not {k!r}.")


def default_k(spec: Any) -> int:
    """Half the layers, as SwiftKV's Llama-3.1-8B (16 of 32)."""
    return spec.num_layers // 2


def single_input_spec(spec: Any, k: int | None = None) -> Any:
    """The ArchSpec single_input_kv's model has, from the spec alone (what the planner costs)."""
    k = default_k(spec) if k is None else k
    check(spec, k)
    return replace(spec, single_input_kv=k)


def single_input_kv(loaded: Any, k: int) -> Any:
    """A copy of the model whose attention layers from `k` on take K/V from a norm of layer k's input."""
    from shrink.blockvariants import install_single_input_kv  # heavy: torch modules

    check(loaded.spec, k)
    model = copy.deepcopy(loaded.model)
    install_single_input_kv(model, k)
    spec = replace(spec_from_model(model), formats=loaded.spec.formats, name=f"{loaded.spec.name}-swiftkv{k}")
    return replace(loaded, model=model.eval(), spec=spec)


def stage_one_parameters(model: Any, queries: bool = True) -> list[Any]:
    """The parameters SwiftKV's first stage trains in a SingleInputKV model: the new norm and the K/V
    projections (with key norms) of the layers from k on, and their query projections when `queries`.
    Layers that share another layer's cache hold no K/V projections, so only their queries count."""
    layers = model.model.layers
    k = next((i for i, block in enumerate(layers) if hasattr(block.input_layernorm, "kv_norm")), None)
    if k is None:
        raise ShrinkError("The model has no SingleInputKV norm: transform it with single_input_kv first.")
    params = list(layers[k].input_layernorm.kv_norm.parameters())
    names = KV_MODULES + (QUERY_MODULES if queries else ())
    for block in layers[k:]:
        attention = blocks.attention(block)
        for name in names:
            if hasattr(attention, name):
                params += list(getattr(attention, name).parameters())
    return params


def freeze_for_stage_one(model: Any, queries: bool = True) -> int:
    """Leave only `stage_one_parameters` trainable (the trainer optimises what requires grad); returns
    how many parameters train."""
    train = stage_one_parameters(model, queries)
    for param in model.parameters():
        param.requires_grad_(False)
    for param in train:
        param.requires_grad_(True)
    return sum(p.numel() for p in train)


def unfreeze(model: Any) -> None:
    for param in model.parameters():
        param.requires_grad_(True)
