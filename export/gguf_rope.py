"""RoPE in a GGUF, written the way llama.cpp reads it back (convert_hf_to_gguf.py and llama.cpp's
loader and graph builders are the authority; the figures below were checked against the pinned
llama-cpp-python by tests/test_gguf_rope.py).

What each Hugging Face `rope_type` becomes:
- default: `{arch}.rope.freq_base` alone.
- linear: `rope.scaling.type` = linear and `rope.scaling.factor`; llama.cpp multiplies every angle by
  1/factor, as Hugging Face divides every inverse frequency by it.
- llama3 (Llama 3.1/3.2): no scaling keys. A float32 tensor `rope_freqs.weight` holds one divisor per
  frequency (head_dim/2 of them), which llama.cpp's llama and deci graphs divide each frequency by:
  1 for short wavelengths, `factor` for long ones, a smooth blend between (the same rule as the
  converter's LlamaModel.generate_extra_tensors). Only those two graphs load the tensor.
- yarn: type yarn, `factor` and `rope.scaling.original_context_length`. llama.cpp derives the
  attention temperature 1 + 0.1 ln(factor) itself (its `yarn_attn_factor` key is overwritten at
  context creation), so a model whose Hugging Face attention factor differs (`attention_factor`,
  `mscale`/`mscale_all_dim`) carries the ratio in `rope.scaling.attn_factor`, the one multiplier
  llama.cpp applies on top. Refused: beta_fast/beta_slow other than 32/1 (llama.cpp's llama, qwen2,
  qwen3 and gemma3 loaders never read the `yarn_beta_*` keys, so it would run 32/1) and
  `truncate: false` (llama.cpp always rounds the correction range).
- Gemma 3 keeps one set per layer type: the global set as above, the sliding set's base as
  `rope.freq_base_swa`. llama.cpp runs the sliding-window layers with freq_scale 1 whatever the file
  says, so a sliding set with scaling is refused; YaRN on the global layers matches (its temperature
  cancels where freq_scale is 1), but not with an attention-factor ratio, which would reach every layer.
Everything else (dynamic NTK, longrope, partial rotary, an unknown type) is refused in one sentence
that names the way out: an ONNX export runs the model's own rotary code.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from shrink.errors import ShrinkError

KNOWN = ("default", "linear", "llama3", "yarn")
FREQ_FACTOR_ARCHES = ("llama", "deci")  # llama.cpp graphs that load rope_freqs.weight
_LAYER_TYPES = ("full_attention", "sliding_attention")
_ONNX = "export it as ONNX (--format onnx) instead"
_WHY_NOT = {
    "dynamic": "its base grows with the sequence length at run time, which llama.cpp never does",
    "longrope": "llama.cpp reads its long and short factor tensors only for Phi-3",
    "proportional": "llama.cpp has no such scaling",
}


def rope_parameters(config: Any, layer_type: str = "full_attention") -> dict:
    """One layer type's RoPE settings as a plain dict with `rope_type` and `rope_theta` always set,
    from a transformers config (v5 `rope_parameters`) or a config.json's fields (v4 `rope_scaling`,
    `rope_theta`, Gemma 3's `rope_local_base_freq`)."""
    raw = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if any(key in raw for key in _LAYER_TYPES):  # one set per layer type (Gemma 3)
        params = dict(raw.get(layer_type) or {})
    elif layer_type == "sliding_attention":  # a v4 Gemma 3 config: rope_scaling is the global layers'
        params = {"rope_type": "default", "rope_theta": getattr(config, "rope_local_base_freq", 10000.0)}
    else:
        params = dict(raw)
    params["rope_type"] = params.get("rope_type") or params.pop("type", None) or "default"
    params["rope_theta"] = float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)
    if params.get("original_max_position_embeddings") is None:
        params["original_max_position_embeddings"] = (getattr(config, "original_max_position_embeddings", None)
                                                      or getattr(config, "max_position_embeddings", None))
    if params["rope_type"] == "yarn" and params.get("factor") is None and params["original_max_position_embeddings"]:
        # Hugging Face's rule for a YaRN config without a factor (DeepSeek-V3 style)
        params["factor"] = getattr(config, "max_position_embeddings", 0) / params["original_max_position_embeddings"]
    return params


def check_rope(config: Any, arch: str) -> None:
    """Refuse, in one sentence, RoPE that a llama.cpp `arch` GGUF cannot reproduce; reads the config only."""
    full = rope_parameters(config)
    kind = full["rope_type"]
    if kind not in KNOWN:
        why = _WHY_NOT.get(kind, f"shrink's GGUF exporter knows only {', '.join(KNOWN)}")
        raise ShrinkError(f"RoPE type '{kind}' cannot be written to a GGUF ({why}); {_ONNX}.")
    if float(full.get("partial_rotary_factor") or 1.0) != 1.0:
        raise ShrinkError(f"RoPE over part of each head (partial_rotary_factor {full['partial_rotary_factor']}) is "
                          f"not exported to GGUF; {_ONNX}.")
    if kind == "llama3" and arch not in FREQ_FACTOR_ARCHES:
        raise ShrinkError(f"llama.cpp's '{arch}' graph does not read the rope_freqs tensor that 'llama3' RoPE "
                          f"scaling needs; {_ONNX}.")
    if kind in ("linear", "yarn") and not full.get("factor"):
        raise ShrinkError(f"RoPE scaling '{kind}' without a factor is not a valid config; fix its factor or {_ONNX}.")
    if kind == "yarn":
        _check_yarn(full, arch)
    if arch == "gemma3":
        local = rope_parameters(config, "sliding_attention")
        if local["rope_type"] != "default":
            raise ShrinkError(f"llama.cpp runs Gemma 3's sliding-window layers without RoPE scaling, but this model "
                              f"scales them ('{local['rope_type']}'); {_ONNX}.")


def _check_yarn(full: dict, arch: str) -> None:
    betas = (float(full.get("beta_fast") or 32), float(full.get("beta_slow") or 1))
    if betas != (32.0, 1.0):
        raise ShrinkError(f"YaRN with beta_fast/beta_slow {betas[0]:g}/{betas[1]:g} cannot be written to a '{arch}' GGUF "
                          f"(llama.cpp reads no beta keys for it and always uses 32/1); {_ONNX}.")
    if full.get("truncate", True) is False:
        raise ShrinkError(f"YaRN with truncate=false (an unrounded correction range) is not what llama.cpp computes; {_ONNX}.")
    if arch == "gemma3" and yarn_attention_factor(full) != _mscale(float(full["factor"])):
        raise ShrinkError("YaRN with its own attention factor on Gemma 3's global layers would scale its sliding-window "
                          f"layers too in llama.cpp; {_ONNX}.")


def write_rope(writer: Any, arch: str, config: Any, head_dim: int) -> None:
    """The RoPE keys (and Llama 3's rope_freqs tensor) of an `arch` GGUF, after check_rope."""
    import gguf

    check_rope(config, arch)
    full = rope_parameters(config)
    writer.add_rope_freq_base(full["rope_theta"])
    if arch == "gemma3":
        writer.add_rope_freq_base_swa(rope_parameters(config, "sliding_attention")["rope_theta"])
    kind = full["rope_type"]
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(full["factor"]))
    elif kind == "yarn":
        factor = float(full["factor"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(factor)
        writer.add_rope_scaling_orig_ctx_len(int(full["original_max_position_embeddings"]))
        ratio = yarn_attention_factor(full) / _mscale(factor)
        if ratio != 1.0:
            writer.add_rope_scaling_attn_factors(ratio)
    elif kind == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_factors(full, head_dim))


def llama3_factors(params: dict, head_dim: int) -> np.ndarray:
    """The divisor of each RoPE frequency under 'llama3' scaling (head_dim/2 float32 values), by the rule
    llama.cpp's converter applies: wavelengths shorter than original_context/high_freq_factor keep
    their frequency, those longer than original_context/low_freq_factor are slowed by `factor`, and
    those between blend the two by where original_context/wavelength falls between the two factors."""
    import torch

    factor = float(params.get("factor", 8.0))
    low, high = float(params.get("low_freq_factor", 1.0)), float(params.get("high_freq_factor", 4.0))
    context = float(params.get("original_max_position_embeddings") or 8192)
    if low == high:
        raise ShrinkError("'llama3' RoPE scaling with low_freq_factor equal to high_freq_factor has no blend range; "
                          f"fix the config or {_ONNX}.")
    freqs = 1.0 / (params["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    wavelength = 2 * math.pi / freqs
    smooth = (context / wavelength - low) / (high - low)
    blended = 1 / ((1 - smooth) / factor + smooth)
    divisors = torch.where(wavelength < context / high, torch.ones_like(freqs),
                           torch.where(wavelength > context / low, torch.full_like(freqs, factor), blended))
    return divisors.to(torch.float32).numpy()


def yarn_attention_factor(params: dict) -> float:
    """Hugging Face's YaRN attention factor (the cos/sin scale): given, or from mscale/mscale_all_dim, or
    the paper's 1 + 0.1 ln(factor)."""
    factor = float(params["factor"])
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return _mscale(factor, mscale) / _mscale(factor, mscale_all_dim)
    return _mscale(factor)


def _mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
