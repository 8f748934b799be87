"""Architecture adapters: a Hugging Face config (or a loaded model) -> ArchSpec, one per family.

A family is keyed by the config's `model_type`. A model type with no adapter fails loudly with the
list of supported ones; there is no generic fallback that would guess a shape and mis-estimate it.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable

from shrink.archspec import ArchSpec, AttentionSpec, FFNSpec, Formats, LayerSpec, SSMSpec
from shrink.errors import ShrinkError

Adapter = Callable[[Any], ArchSpec]
_ADAPTERS: dict[str, Adapter] = {}


def register(*model_types: str) -> Callable[[Adapter], Adapter]:
    def wrap(fn: Adapter) -> Adapter:
        for model_type in model_types:
            _ADAPTERS[model_type] = fn
        return fn

    return wrap


def supported_model_types() -> list[str]:
    return sorted(_ADAPTERS)


def spec_from_config(config: Any) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    adapter = _ADAPTERS.get(model_type)
    if adapter is None:
        raise ShrinkError(
            f"Architecture '{model_type}' is not supported; supported model types: "
            f"{', '.join(supported_model_types())}."
        )
    return adapter(config)


def _dtype_format(config: Any) -> str:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    name = str(dtype).replace("torch.", "") if dtype is not None else "bfloat16"
    return {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}.get(name, "bf16")


def _formats(config: Any) -> Formats:
    fmt = _dtype_format(config)
    return Formats(weights=fmt, embeddings=fmt, activations=fmt, kv_cache=fmt, other=fmt)


def _head_dim(config: Any) -> int:
    head_dim = getattr(config, "head_dim", None)
    return head_dim or config.hidden_size // config.num_attention_heads


def _layer_windows(config: Any) -> list[int | None]:
    """Sliding window per layer: from `layer_types` when the config has them, else global."""
    n = config.num_hidden_layers
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return [window if t == "sliding_attention" else None for t in layer_types]
    return [window] * n


def _decoder_spec(
    config: Any, family: str, *, norms: int, qk_norm: bool, qkv_bias: bool, o_bias: bool, ffn_bias: bool
) -> ArchSpec:
    head_dim = _head_dim(config)
    ffn = FFNSpec(kind="gated", width=config.intermediate_size, bias=ffn_bias)
    layers = tuple(
        LayerSpec(
            mixer=AttentionSpec(
                num_heads=config.num_attention_heads,
                num_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
                head_dim=head_dim,
                sliding_window=window,
                qk_norm=qk_norm,
                qkv_bias=qkv_bias,
                o_bias=o_bias,
            ),
            ffn=ffn,
            norms=norms,
        )
        for window in _layer_windows(config)
    )
    return ArchSpec(
        family=family,
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        layers=layers,
        formats=_formats(config),
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        name=getattr(config, "_name_or_path", "") or "",
    )


@register("llama")
def _llama(config: Any) -> ArchSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _decoder_spec(
        config, "llama", norms=2, qk_norm=False, qkv_bias=bias, o_bias=bias,
        ffn_bias=bool(getattr(config, "mlp_bias", False)),
    )


@register("mistral")
def _mistral(config: Any) -> ArchSpec:
    return _decoder_spec(config, "mistral", norms=2, qk_norm=False, qkv_bias=False, o_bias=False, ffn_bias=False)


@register("qwen2")
def _qwen2(config: Any) -> ArchSpec:
    # Qwen2 hard-codes a bias on q/k/v and none on o_proj, whatever attention_bias says.
    return _decoder_spec(config, "qwen2", norms=2, qk_norm=False, qkv_bias=True, o_bias=False, ffn_bias=False)


@register("qwen3")
def _qwen3(config: Any) -> ArchSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _decoder_spec(config, "qwen3", norms=2, qk_norm=True, qkv_bias=bias, o_bias=bias, ffn_bias=False)


@register("gemma3_text", "gemma3")
def _gemma3(config: Any) -> ArchSpec:
    # The multimodal gemma3 config wraps the language model's config; only the text decoder is costed.
    text = getattr(config, "text_config", None) or config
    bias = bool(getattr(text, "attention_bias", False))
    return _decoder_spec(text, "gemma3", norms=4, qk_norm=True, qkv_bias=bias, o_bias=bias, ffn_bias=False)


@register("nemotron_h")
def _nemotron_h(config: Any) -> ArchSpec:
    if getattr(config, "moe_latent_size", None):
        raise ShrinkError("Nemotron-H with a latent MoE projection (moe_latent_size) is not supported yet.")
    if getattr(config, "num_nextn_predict_layers", 0):
        raise ShrinkError("Nemotron-H with multi-token-prediction layers is not supported yet.")
    attention = AttentionSpec(
        num_heads=config.num_attention_heads,
        num_kv_heads=config.num_key_value_heads,
        head_dim=_head_dim(config),
        sliding_window=getattr(config, "sliding_window", None),
    )
    ssm = SSMSpec(
        num_heads=config.mamba_num_heads,
        head_dim=config.mamba_head_dim,
        num_groups=config.n_groups,
        state_size=config.ssm_state_size,
        conv_kernel=config.conv_kernel,
        proj_bias=bool(config.use_bias),
        conv_bias=bool(config.use_conv_bias),
    )
    mlp = FFNSpec(kind="mlp", width=config.intermediate_size, bias=bool(config.mlp_bias))
    moe = FFNSpec(
        kind="mlp",
        width=config.moe_intermediate_size,
        bias=bool(config.mlp_bias),
        num_experts=config.n_routed_experts,
        experts_per_token=config.num_experts_per_tok,
        shared_width=config.moe_shared_expert_intermediate_size if config.n_shared_experts else 0,
    )
    blocks = {
        "linear_attention": LayerSpec(mixer=ssm, ffn=None, norms=1),
        "full_attention": LayerSpec(mixer=attention, ffn=None, norms=1),
        "mlp": LayerSpec(mixer=None, ffn=mlp, norms=1),
        "moe": LayerSpec(mixer=None, ffn=moe, norms=1),
    }
    formats = _formats(config)
    if getattr(config, "mamba_ssm_cache_dtype", "float32") != "float32":
        formats = replace(formats, ssm_state=_dtype_format(config))
    return ArchSpec(
        family="nemotron_h",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        tied_embeddings=bool(config.tie_word_embeddings),
        layers=tuple(blocks[kind] for kind in config.layers_block_type),
        formats=formats,
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        name=getattr(config, "_name_or_path", "") or "",
    )


def spec_from_model(model: Any) -> ArchSpec:
    """ArchSpec of an instantiated model, read from its tensor shapes so that per-layer widths left
    by pruning (which the config cannot express) are described as they are."""
    spec = spec_from_config(model.config)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    embed = model.get_input_embeddings().weight
    layers = tuple(_measured_layer(block, layer) for block, layer in zip(decoder.layers, spec.layers))
    return replace(spec, vocab_size=embed.shape[0], hidden_size=embed.shape[1], layers=layers)


def _measured_layer(block: Any, layer: LayerSpec) -> LayerSpec:
    mixer_module = getattr(block, "self_attn", None) or getattr(block, "mixer", None)
    mixer, ffn = layer.mixer, layer.ffn
    if isinstance(mixer, AttentionSpec):
        heads = mixer_module.q_proj.out_features // mixer.head_dim
        kv_proj = getattr(mixer_module, "k_proj", None)
        kv_heads = kv_proj.out_features // mixer.head_dim if kv_proj is not None else mixer.num_kv_heads
        mixer = replace(mixer, num_heads=heads, num_kv_heads=kv_heads)
    elif isinstance(mixer, SSMSpec):
        heads = mixer_module.A_log.numel()
        mixer = replace(mixer, num_heads=heads, head_dim=mixer_module.out_proj.in_features // heads)
    if ffn is not None and not ffn.is_moe:
        mlp = getattr(block, "mlp", None) or mixer_module
        ffn = replace(ffn, width=mlp.up_proj.out_features)
    return replace(layer, mixer=mixer, ffn=ffn)
