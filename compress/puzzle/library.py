"""The library of block variants per layer and their initialisation from the parent (Puzzle §2, App. A).

Attention: the parent; fewer KV heads (the parent's KV heads mean-pooled within each merged group,
every query head kept); linear (W_o·W_v: a token attending only to itself, exact at sequence length
1); no-op. FFN: the parent; a share of its width keeping the channels of largest contribution
|X_i|·||W_down[:, i]|| (Minitron's activation importance times the channel's output norm); linear
(W_down·W_up, the gate ignored); no-op. Input and output widths never change, so any variant fits
any layer. Llama-family parents that GraniteMoeHybrid can host (compress/puzzle/granite.py) also get a
Mamba2 mixer in place of attention (a head per attention head, twice the hidden width), initialised fresh
and learnt by blockwise distillation alone; a child with Mamba2 mixers is rebuilt as a GraniteMoeHybrid,
which holds no other variant, so the solver keeps every other sub-block the parent's when it picks one.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from typing import Any, Literal

from shrink import blocks
from shrink.archspec import ArchSpec, AttentionSpec, FFNSpec, LayerSpec, LinearSpec, SSMSpec
from shrink.compress.prune import narrow_mlp
from shrink.compress.search import round_width
from shrink.compress.puzzle.granite import MAMBA_CONV, MAMBA_EXPAND, MAMBA_GROUPS, MAMBA_STATE, hosts_mamba2, mamba_mixer
from shrink.errors import ShrinkError

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")
FFN_SHARES = (0.75, 0.5, 0.25, 0.1)


@dataclass(frozen=True)
class Variant:
    sub: Literal["attention", "ffn"]
    name: str  # parent | kv<n> | ffn<percent> | linear | none | mamba2

    @property
    def key(self) -> str:
        return f"{self.sub}:{self.name}"

    @property
    def trained(self) -> bool:
        """Whether blockwise distillation has anything to learn (the parent and a no-op do not)."""
        return self.name not in ("parent", "none")


def check_family(spec: ArchSpec) -> None:
    if spec.family not in SUPPORTED_FAMILIES:
        raise ShrinkError(f"Puzzle needs a decoder with attention and an FFN in every layer; '{spec.family}' is not one "
                          f"of {', '.join(SUPPORTED_FAMILIES)}.")
    if not all(isinstance(l.mixer, AttentionSpec) and isinstance(l.ffn, FFNSpec) and not l.ffn.is_moe for l in spec.layers):
        raise ShrinkError("Puzzle starts from the parent model: every layer must hold its own attention and dense FFN "
                          "(this model was already changed by a Puzzle or KV-sharing step).")


def attention_variants(layer: LayerSpec, mamba2: bool = False) -> list[Variant]:
    a = layer.mixer
    fewer = [n for n in range(a.num_kv_heads - 1, 0, -1) if a.num_kv_heads % n == 0]
    return [Variant("attention", name) for name in ["parent", *(f"kv{n}" for n in fewer), "linear", "none",
                                                     *(["mamba2"] if mamba2 else [])]]


def ffn_variants(shares: tuple[float, ...] = FFN_SHARES) -> list[Variant]:
    return [Variant("ffn", name) for name in ["parent", *(f"ffn{round(s * 100)}" for s in shares), "linear", "none"]]


def library(spec: ArchSpec, shares: tuple[float, ...] = FFN_SHARES) -> list[list[Variant]]:
    """Per layer: its attention variants followed by its FFN variants."""
    check_family(spec)
    mamba2 = hosts_mamba2(spec)
    return [attention_variants(layer, mamba2) + ffn_variants(shares) for layer in spec.layers]


def holds_together(variants: list[Variant]) -> bool:
    """Whether one model can hold these choices: a GraniteMoeHybrid (any Mamba2 mixer) holds no other variant
    than the parent's sub-blocks and Mamba2 mixers."""
    return not any(v.name == "mamba2" for v in variants) or all(v.name in ("parent", "mamba2") for v in variants)


def mamba2_spec(attention: AttentionSpec) -> SSMSpec:
    """The Mamba2 mixer that replaces `attention` (hidden = heads x head_dim, checked by hosts_mamba2)."""
    inner = MAMBA_EXPAND * attention.num_heads * attention.head_dim
    return SSMSpec(num_heads=attention.num_heads, head_dim=inner // attention.num_heads, num_groups=MAMBA_GROUPS,
                   state_size=MAMBA_STATE, conv_kernel=MAMBA_CONV)


def ffn_width(parent: FFNSpec, name: str) -> int:
    # Minitron's width rule (multiples of 32 from 256 wide): a narrowed FFN's rows fill whole quantization blocks
    return round_width(parent.width * int(name[3:]) / 100, parent.width)


def variant_layer(parent: LayerSpec, variant: Variant) -> LayerSpec:
    """The LayerSpec of `parent` with one sub-block replaced by `variant`."""
    name = variant.name
    if variant.sub == "attention":
        mixer = {"parent": parent.mixer, "linear": LinearSpec(), "none": None}.get(name)
        if name == "mamba2":
            mixer = mamba2_spec(parent.mixer)
        if name.startswith("kv"):
            mixer = replace(parent.mixer, num_kv_heads=int(name[2:]))
        return replace(parent, mixer=mixer)
    ffn = {"parent": parent.ffn, "linear": LinearSpec(), "none": None}.get(name)
    if name.startswith("ffn"):
        ffn = replace(parent.ffn, width=ffn_width(parent.ffn, name))
    return replace(parent, ffn=ffn)


def build(block: Any, layer: LayerSpec, variant: Variant, layer_idx: int, ffn_importance: Any = None) -> Any:
    """A new module for `variant`, initialised from the parent decoder layer `block` (left unchanged)."""
    import torch

    from shrink.blockvariants import Mamba2Mixer, ffn_variant, mixer_variant

    parent = blocks.attention(block) if variant.sub == "attention" else blocks.mlp(block)
    hidden = parent.q_proj.in_features if variant.sub == "attention" else parent.down_proj.out_features
    dtype = parent.o_proj.weight.dtype if variant.sub == "attention" else parent.down_proj.weight.dtype
    name = variant.name
    if name == "parent":
        return copy.deepcopy(parent)
    if name == "none":
        return mixer_variant("none", hidden, dtype, layer_idx) if variant.sub == "attention" else ffn_variant("none", hidden, dtype)
    if name == "mamba2":
        module = Mamba2Mixer(mamba_mixer(parent.config, layer_idx).to(dtype))
        with torch.no_grad():  # starts as a no-op (normalized MSE 1), not as a random map orders larger
            module.mamba.out_proj.weight.zero_()
        return module
    with torch.no_grad():
        if variant.sub == "attention" and name == "linear":
            module = mixer_variant("linear", hidden, dtype, layer_idx)
            module.o_proj.weight.copy_(_attention_as_linear(parent, layer.mixer))
            return module
        if variant.sub == "attention":
            return _pooled_kv(parent, layer.mixer, int(name[2:]))
        if name == "linear":
            module = ffn_variant("linear", hidden, dtype)
            module.down_proj.weight.copy_(parent.down_proj.weight @ parent.up_proj.weight)
            return module
        if ffn_importance is None:
            raise ShrinkError("Narrowing an FFN variant needs the FFN's activation importance.")
        return _narrowed_ffn(parent, ffn_importance, ffn_width(layer.ffn, name))


def _attention_as_linear(attn: Any, a: AttentionSpec) -> Any:
    """sum over query heads h of W_o[:, h] · W_v[kv(h)]: attention over the token itself alone."""
    d = a.head_dim
    per_group = a.num_heads // a.num_kv_heads
    w_o, w_v = attn.o_proj.weight, attn.v_proj.weight
    return sum(w_o[:, h * d:(h + 1) * d] @ w_v[(h // per_group) * d:(h // per_group + 1) * d] for h in range(a.num_heads))


def _pooled_kv(attn: Any, a: AttentionSpec, kv_heads: int) -> Any:
    """Merge each run of num_kv_heads / kv_heads adjacent KV heads into their mean (Puzzle's init)."""
    import torch

    module = copy.deepcopy(attn)
    merge, d = a.num_kv_heads // kv_heads, a.head_dim
    for name in ("k_proj", "v_proj"):
        old = getattr(attn, name)
        new = torch.nn.Linear(old.in_features, kv_heads * d, bias=old.bias is not None, dtype=old.weight.dtype)
        new.weight.copy_(old.weight.view(kv_heads, merge, d, -1).mean(1).reshape(kv_heads * d, -1))
        if old.bias is not None:
            new.bias.copy_(old.bias.view(kv_heads, merge, d).mean(1).reshape(-1))
        setattr(module, name, new)
    module.num_key_value_groups = a.num_heads // kv_heads
    return module


def _narrowed_ffn(mlp: Any, importance: Any, width: int) -> Any:
    import torch

    contribution = importance.to(mlp.down_proj.weight.dtype) * mlp.down_proj.weight.norm(dim=0)
    keep = torch.sort(torch.topk(contribution, width).indices).values
    module = copy.deepcopy(mlp)
    narrow_mlp(module, keep)
    return module
