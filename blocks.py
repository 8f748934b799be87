"""Where each family keeps its modules, so importance and pruning speak of blocks, not class names.

Llama-style decoders (Llama, Mistral, Qwen2/3, Gemma 3) hold attention and an FFN in every layer
(`self_attn`, `mlp`). Nemotron-H holds one mixer per block (`mixer`), whose kind `block_type` names:
a Mamba2 SSM, attention, an MLP or an MoE.
"""

from __future__ import annotations

from typing import Any

DECODER_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


def _mixer_of_kind(block: Any, kind: str) -> Any:
    return block.mixer if getattr(block, "block_type", None) == kind else None


def attention(block: Any) -> Any:
    return getattr(block, "self_attn", None) or _mixer_of_kind(block, "full_attention")


def set_attention(block: Any, module: Any) -> None:
    """Put `module` where the block keeps its attention (`self_attn`, or a Nemotron-H attention block's `mixer`)."""
    setattr(block, "self_attn" if hasattr(block, "self_attn") else "mixer", module)


def mlp(block: Any) -> Any:
    return getattr(block, "mlp", None) or _mixer_of_kind(block, "mlp")


def moe(block: Any) -> Any:
    return _mixer_of_kind(block, "moe")


def ssm(block: Any) -> Any:
    return _mixer_of_kind(block, "linear_attention")


def hidden_norms(block: Any) -> list[Any]:
    """The norms over the residual stream's width inside one block."""
    if hasattr(block, "mixer"):
        return [block.norm]
    return [getattr(block, name) for name in DECODER_NORMS if hasattr(block, name)]


def embedding(model: Any) -> Any:
    decoder = model.model
    return getattr(decoder, "embed_tokens", None) or decoder.embeddings


def final_norm(model: Any) -> Any:
    decoder = model.model
    return getattr(decoder, "norm", None) or decoder.norm_f


def is_norm(module: Any) -> bool:
    return "RMSNorm" in type(module).__name__


def set_epsilon(module: Any, value: float) -> None:
    for attribute in ("eps", "variance_epsilon"):
        if hasattr(module, attribute):
            setattr(module, attribute, value)


def epsilon(module: Any) -> float | None:
    for attribute in ("eps", "variance_epsilon"):
        if hasattr(module, attribute):
            return float(getattr(module, attribute))
    return None
