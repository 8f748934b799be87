"""Architecture adapters: a Hugging Face config (or a loaded model) -> ArchSpec, one per family.

A family is keyed by the config's `model_type`. A model type with no adapter fails loudly with the
list of supported ones; there is no generic fallback that would guess a shape and mis-estimate it.

An adapter reads a transformers config object, or a config.json read as plain JSON (`config_from_dict`):
commands that need only a config (estimate, inspect) then import neither transformers nor torch. For
that, each family records its transformers config class's defaults for the fields its adapter reads
(a config.json omits what equals them) and what the class derives when it is built (layer types,
windows, legacy names); tests/test_archspec.py holds both to transformers itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from types import SimpleNamespace
from typing import Any, Callable, Mapping

from shrink.archspec import ArchSpec, AttentionSpec, FFNSpec, Formats, LayerSpec, LinearSpec, SSMSpec
from shrink.errors import ShrinkError

Adapter = Callable[[Any], ArchSpec]
Settle = Callable[[dict[str, Any]], None]


def _nothing_derived(fields: dict[str, Any]) -> None:
    return None


@dataclass(frozen=True)
class Family:
    adapter: Adapter
    defaults: Mapping[str, Any] = field(default_factory=dict)  # the config class's defaults the adapter reads
    settle: Settle = _nothing_derived  # what the config class derives from the fields when it is built


_FAMILIES: dict[str, Family] = {}


def register(*model_types: str, defaults: Mapping[str, Any] | None = None, settle: Settle | None = None):
    def wrap(fn: Adapter) -> Adapter:
        for model_type in model_types:
            _FAMILIES[model_type] = Family(fn, dict(defaults or {}), settle or _nothing_derived)
        return fn

    return wrap


def supported_model_types() -> list[str]:
    return sorted(_FAMILIES)


def _family(model_type: Any) -> Family:
    family = _FAMILIES.get(model_type)
    if family is None:
        raise ShrinkError(
            f"Architecture '{model_type}' is not supported; supported model types: "
            f"{', '.join(supported_model_types())}."
        )
    return family


def spec_from_config(config: Any) -> ArchSpec:
    """The ArchSpec of a transformers config or of a `config_from_dict` view of a config.json."""
    return _family(getattr(config, "model_type", None)).adapter(config)


# Older configs name layer kinds as transformers did before v5 (PreTrainedConfig remaps them on load).
_LEGACY_LAYER_TYPES = {"mamba": "linear_attention", "attention": "full_attention"}


def _remapped(kinds: list[str]) -> list[str]:
    return [_LEGACY_LAYER_TYPES.get(kind, kind) for kind in kinds]


def config_from_dict(data: Mapping[str, Any]) -> SimpleNamespace:
    """A config.json's contents as its family's transformers config class would read them: the class's
    defaults for omitted fields, the fields it derives, `torch_dtype` read as `dtype`; other fields are
    kept as they are. Raises ShrinkError for a model type with no adapter."""
    family = _family(data.get("model_type"))
    fields = {**family.defaults, **data}
    if fields.get("dtype") is None:
        fields["dtype"] = fields.pop("torch_dtype", None)
    if fields.get("layer_types") is not None:
        fields["layer_types"] = _remapped(fields["layer_types"])
    family.settle(fields)
    return SimpleNamespace(**fields)


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


_DECODER = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "max_position_embeddings", "tie_word_embeddings")


def _defaults(values: tuple, **extra: Any) -> dict[str, Any]:
    """The decoder fields' class defaults in `_DECODER` order, plus the family's own fields."""
    return {**dict(zip(_DECODER, values, strict=True)), **extra}


@register("llama", defaults=_defaults((32000, 4096, 11008, 32, 32, None, 2048, False),
                                      head_dim=None, attention_bias=False, mlp_bias=False))
def _llama(config: Any) -> ArchSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _decoder_spec(
        config, "llama", norms=2, qk_norm=False, qkv_bias=bias, o_bias=bias,
        ffn_bias=bool(getattr(config, "mlp_bias", False)),
    )


@register("mistral", defaults=_defaults((32000, 4096, 14336, 32, 32, 8, 4096 * 32, False),
                                        head_dim=None, sliding_window=4096))
def _mistral(config: Any) -> ArchSpec:
    return _decoder_spec(config, "mistral", norms=2, qk_norm=False, qkv_bias=False, o_bias=False, ffn_bias=False)


def _settle_qwen(fields: dict[str, Any]) -> None:
    """Qwen2/Qwen3: the window applies only with use_sliding_window, from layer max_window_layers on."""
    if not fields["use_sliding_window"]:
        fields["sliding_window"] = None
    if fields["layer_types"] is None:
        fields["layer_types"] = [
            "sliding_attention" if fields["sliding_window"] is not None and i >= fields["max_window_layers"]
            else "full_attention"
            for i in range(fields["num_hidden_layers"])
        ]


_QWEN_WINDOWS = dict(use_sliding_window=False, sliding_window=4096, max_window_layers=28, layer_types=None)


@register("qwen2", defaults=_defaults((151936, 4096, 22016, 32, 32, 32, 32768, False), **_QWEN_WINDOWS),
          settle=_settle_qwen)
def _qwen2(config: Any) -> ArchSpec:
    # Qwen2 hard-codes a bias on q/k/v and none on o_proj, whatever attention_bias says.
    return _decoder_spec(config, "qwen2", norms=2, qk_norm=False, qkv_bias=True, o_bias=False, ffn_bias=False)


@register("qwen3", defaults=_defaults((151936, 4096, 22016, 32, 32, 32, 32768, False), head_dim=128,
                                      attention_bias=False, **_QWEN_WINDOWS), settle=_settle_qwen)
def _qwen3(config: Any) -> ArchSpec:
    bias = bool(getattr(config, "attention_bias", False))
    return _decoder_spec(config, "qwen3", norms=2, qk_norm=True, qkv_bias=bias, o_bias=bias, ffn_bias=False)


def _settle_gemma3_text(fields: dict[str, Any]) -> None:
    if fields["use_bidirectional_attention"]:
        fields["sliding_window"] = fields["sliding_window"] // 2 + 1  # transformers' exclusive bound
    if fields["layer_types"] is None:  # older configs give a period instead: every n-th layer is global
        period = fields.get("sliding_window_pattern", 6)
        fields["layer_types"] = ["sliding_attention" if (i + 1) % period else "full_attention"
                                 for i in range(fields["num_hidden_layers"])]


def _settle_gemma3(fields: dict[str, Any]) -> None:
    """The multimodal config holds the decoder's config as a nested object."""
    fields["text_config"] = config_from_dict({"model_type": "gemma3_text", **(fields.get("text_config") or {})})


@register("gemma3", settle=_settle_gemma3)
@register("gemma3_text", defaults=_defaults((262_208, 2304, 9216, 26, 8, 4, 131_072, True), head_dim=256,
                                            attention_bias=False, sliding_window=4096, layer_types=None,
                                            use_bidirectional_attention=False), settle=_settle_gemma3_text)
def _gemma3(config: Any) -> ArchSpec:
    # The multimodal gemma3 config wraps the language model's config; only the text decoder is costed.
    text = getattr(config, "text_config", None) or config
    bias = bool(getattr(text, "attention_bias", False))
    return _decoder_spec(text, "gemma3", norms=4, qk_norm=True, qkv_bias=bias, o_bias=bias, ffn_bias=False)


_NEMOTRON_PATTERN = {"M": "linear_attention", "E": "moe", "*": "full_attention", "-": "mlp"}
_NEMOTRON_LEGACY_NAMES = {"mamba_n_groups": "n_groups", "mamba_d_conv": "conv_kernel",
                          "mamba_conv_bias": "use_conv_bias"}


def _settle_nemotron_h(fields: dict[str, Any]) -> None:
    """Layer kinds from `layer_types` (its alias), else the older `hybrid_override_pattern` string."""
    for legacy, name in _NEMOTRON_LEGACY_NAMES.items():
        if legacy in fields:
            fields[name] = fields.pop(legacy)
    if fields.get("layer_types") is not None:
        fields["layers_block_type"] = fields["layer_types"]
    pattern = fields.get("hybrid_override_pattern")
    if fields["layers_block_type"] is None and pattern is not None:
        unknown = sorted(set(pattern) - set(_NEMOTRON_PATTERN))
        if unknown:
            raise ShrinkError(f"Nemotron-H hybrid_override_pattern has unknown layer codes {unknown}; "
                              f"known: {', '.join(_NEMOTRON_PATTERN)}.")
        fields["layers_block_type"] = [_NEMOTRON_PATTERN[code] for code in pattern]
    fields["layers_block_type"] = _remapped(fields["layers_block_type"] or
                                            ["linear_attention", "moe", "full_attention", "mlp"])


@register("nemotron_h", defaults=dict(
    vocab_size=131072, hidden_size=4096, layers_block_type=None, tie_word_embeddings=False,
    num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=4096, sliding_window=None,
    intermediate_size=21504, mlp_bias=False, ssm_state_size=128, mamba_num_heads=128, mamba_head_dim=64,
    n_groups=8, conv_kernel=4, use_conv_bias=True, mamba_ssm_cache_dtype="float32", n_routed_experts=8,
    n_shared_experts=1, moe_intermediate_size=7688, moe_shared_expert_intermediate_size=7688,
    moe_latent_size=None, num_experts_per_tok=2, num_nextn_predict_layers=0, use_bias=False,
), settle=_settle_nemotron_h)
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
    unknown = sorted(set(config.layers_block_type) - set(blocks))
    if unknown:
        raise ShrinkError(f"Nemotron-H layer kinds {unknown} are not supported; known: {', '.join(blocks)}.")
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


_GRANITE_KINDS = {"attention": "attention", "full_attention": "attention", "mamba": "mamba", "linear_attention": "mamba"}


def _settle_granite(fields: dict[str, Any]) -> None:
    """Every layer attention unless layer_types says which are Mamba2 (transformers writes either spelling)."""
    if fields.get("layer_types") is None:
        fields["layer_types"] = ["attention"] * fields["num_hidden_layers"]


@register("granitemoehybrid", defaults=_defaults(
    (100352, 1024, 2048, 24, 16, 8, 8192, True), shared_intermediate_size=1024, layer_types=None,
    num_local_experts=0, mamba_n_heads=128, mamba_d_head="auto", mamba_n_groups=1, mamba_d_state=256,
    mamba_d_conv=4, mamba_expand=2, mamba_conv_bias=True, mamba_proj_bias=False, attention_bias=False,
    position_embedding_type="nope"), settle=_settle_granite)
def _granite_hybrid(config: Any) -> ArchSpec:
    """IBM's GraniteMoeHybrid with a dense shared MLP: Mamba2 and attention layers, each with the MLP
    (the host of a Puzzle child with Mamba2 mixers, compress/puzzle/granite.py)."""
    if getattr(config, "num_local_experts", 0):
        raise ShrinkError("GraniteMoeHybrid with experts (num_local_experts > 0) is not supported yet; its dense form is.")
    unknown = sorted(set(config.layer_types) - set(_GRANITE_KINDS))
    if unknown:
        raise ShrinkError(f"GraniteMoeHybrid layer types {unknown} are not supported; known: {', '.join(_GRANITE_KINDS)}.")
    inner = config.mamba_expand * config.hidden_size
    head_dim = config.mamba_d_head if config.mamba_d_head != "auto" else inner // config.mamba_n_heads
    ssm = SSMSpec(num_heads=config.mamba_n_heads, head_dim=head_dim, num_groups=config.mamba_n_groups,
                  state_size=config.mamba_d_state, conv_kernel=config.mamba_d_conv,
                  proj_bias=bool(config.mamba_proj_bias), conv_bias=bool(config.mamba_conv_bias))
    bias = bool(getattr(config, "attention_bias", False))
    attention = AttentionSpec(num_heads=config.num_attention_heads,
                              num_kv_heads=config.num_key_value_heads or config.num_attention_heads,
                              head_dim=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
                              qkv_bias=bias, o_bias=bias)
    ffn = FFNSpec(kind="gated", width=config.shared_intermediate_size, bias=False)
    mixers = {"attention": attention, "mamba": ssm}
    return ArchSpec(
        family="granitemoehybrid",
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        tied_embeddings=bool(config.tie_word_embeddings),
        layers=tuple(LayerSpec(mixer=mixers[_GRANITE_KINDS[kind]], ffn=ffn, norms=2) for kind in config.layer_types),
        formats=_formats(config),
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
    # SingleInputKV (blockvariants.SingleInputKVNorm): the layer whose input feeds the later layers' K/V
    single = next((i for i, block in enumerate(decoder.layers)
                   if getattr(getattr(block, "input_layernorm", None), "single_input_kv", None) is not None), None)
    return replace(spec, vocab_size=embed.shape[0], hidden_size=embed.shape[1], layers=layers,
                   single_input_kv=single)


def _variant_spec(module: Any, parent: Any) -> Any:
    """A Puzzle variant module's spec (blockvariants.py), or `parent` for the family's own module."""
    variant = getattr(module, "variant", None)
    return None if variant == "none" else LinearSpec() if variant == "linear" else parent


def _measured_layer(block: Any, layer: LayerSpec) -> LayerSpec:
    mixer_module = getattr(block, "self_attn", None) or getattr(block, "mixer", None) or getattr(block, "mamba", None)
    mixer, ffn = _variant_spec(mixer_module, layer.mixer), _variant_spec(getattr(block, "mlp", None), layer.ffn)
    if isinstance(mixer, AttentionSpec) and getattr(mixer_module, "kv_source", None) is not None:
        # cross-layer KV sharing (blockvariants.SharedKVAttention): the source layer's K/V heads
        mixer = replace(mixer, num_heads=mixer_module.q_proj.out_features // mixer.head_dim,
                        num_kv_heads=mixer_module.num_kv_heads, kv_source=mixer_module.kv_source)
    elif isinstance(mixer, AttentionSpec):
        heads = mixer_module.q_proj.out_features // mixer.head_dim
        kv_proj = getattr(mixer_module, "k_proj", None)
        kv_heads = kv_proj.out_features // mixer.head_dim if kv_proj is not None else mixer.num_kv_heads
        mixer = replace(mixer, num_heads=heads, num_kv_heads=kv_heads)
    elif isinstance(mixer, SSMSpec):
        heads = mixer_module.A_log.numel()
        mixer = replace(mixer, num_heads=heads, head_dim=mixer_module.out_proj.in_features // heads)
    if isinstance(ffn, FFNSpec) and not ffn.is_moe and getattr(block, "shared_mlp", None) is not None:
        ffn = replace(ffn, width=block.shared_mlp.output_linear.in_features)  # GraniteMoeHybrid: gate and up joined
    elif isinstance(ffn, FFNSpec) and not ffn.is_moe:
        mlp = getattr(block, "mlp", None) or mixer_module
        ffn = replace(ffn, width=mlp.up_proj.out_features)
    return replace(layer, mixer=mixer, ffn=ffn)
