"""Per-layer widths that a Hugging Face config cannot express, kept beside it so models reload.

A non-uniformly pruned decoder (a different FFN width or head count per layer) is saved with its
config's uniform fields set to the widest layer and `shrink_layer_shapes` listing every layer's
real widths. Loading builds the widest model, narrows each layer's projections to the recorded
shapes and only then reads the weights, so the tensors load with their saved shapes. Only the
shrink loader (`shrink.model.load`) knows the key; plain `from_pretrained` refuses the shapes.
A SingleInputKV model (compress/swiftkv.py) also records its k under `shrink_single_input_kv`, and
the loader installs the extra norm and the K/V rewiring before reading the weights.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from shrink import blocks
from shrink.archspec import ArchSpec, AttentionSpec, LinearSpec
from shrink.errors import ShrinkError
from shrink.families import spec_from_config

KEY = "shrink_layer_shapes"
SINGLE_INPUT_KV_KEY = "shrink_single_input_kv"  # SwiftKV's k: layers from k on take K/V from a norm of k's input


def record(model: Any, spec: ArchSpec) -> None:
    """Write the per-layer shapes into the model's config when its layers differ (no-op otherwise)."""
    config = getattr(model.config, "text_config", None) or model.config
    parents = spec_from_config(model.config).layers
    variants = any(layer.mixer_kind != parent.mixer_kind or type(layer.ffn) is not type(parent.ffn) or
                   (isinstance(layer.mixer, AttentionSpec) and not layer.mixer.owns_kv)
                   for layer, parent in zip(spec.layers, parents))
    if spec.single_input_kv is not None:
        setattr(config, SINGLE_INPUT_KV_KEY, spec.single_input_kv)
    elif hasattr(config, SINGLE_INPUT_KV_KEY):
        delattr(config, SINGLE_INPUT_KV_KEY)
    if spec.is_uniform and not variants and spec.single_input_kv is None:
        if hasattr(config, KEY):
            delattr(config, KEY)
        return
    shapes = []
    for layer, parent in zip(spec.layers, parents):
        mixer = layer.mixer if isinstance(layer.mixer, AttentionSpec) else None
        ffn = layer.dense_ffn
        shape = {"ffn": ffn.width if ffn is not None else None,
                 "heads": mixer.num_heads if mixer else None, "kv_heads": mixer.num_kv_heads if mixer else None}
        # A Puzzle variant (no-op or linear) where the family has attention or an FFN
        if isinstance(parent.mixer, AttentionSpec) and mixer is None:
            shape["mixer_variant"] = layer.mixer_kind
        if parent.dense_ffn is not None and ffn is None:
            shape["ffn_variant"] = "linear" if isinstance(layer.ffn, LinearSpec) else "none"
        if mixer is not None and not mixer.owns_kv:  # cross-layer KV sharing: the layer whose cache it reads
            shape["kv_source"] = mixer.kv_source
        shapes.append(shape)
    setattr(config, KEY, shapes)
    widest = [s for s in shapes if s["heads"] is not None]
    config.intermediate_size = max((s["ffn"] for s in shapes if s["ffn"] is not None), default=config.intermediate_size)
    if widest:
        config.num_attention_heads = max(s["heads"] for s in widest)
        config.num_key_value_heads = max(s["kv_heads"] for s in widest)
        attention = next(layer.mixer for layer in spec.layers if isinstance(layer.mixer, AttentionSpec))
        config.head_dim = attention.head_dim  # pinned: it would otherwise follow the head count


def shapes_of(config: Any) -> list[dict] | None:
    config = getattr(config, "text_config", None) or config
    return getattr(config, KEY, None)


def apply_to_spec(spec: ArchSpec, config: Any) -> ArchSpec:
    """The ArchSpec of a config with recorded per-layer shapes (spec_from_config sees only the widest)."""
    shapes = shapes_of(config)
    if not shapes:
        return spec
    text = getattr(config, "text_config", None) or config
    spec = replace(spec, single_input_kv=getattr(text, SINGLE_INPUT_KV_KEY, None))
    layers = []
    variants = {"linear": LinearSpec(), "none": None}
    for layer, shape in zip(spec.layers, shapes):
        mixer, ffn = layer.mixer, layer.ffn
        if isinstance(mixer, AttentionSpec) and shape["heads"] is not None:
            mixer = replace(mixer, num_heads=shape["heads"], num_kv_heads=shape["kv_heads"])
        if ffn is not None and shape["ffn"] is not None:
            ffn = replace(ffn, width=shape["ffn"])
        mixer = variants[shape["mixer_variant"]] if "mixer_variant" in shape else mixer
        if isinstance(mixer, AttentionSpec) and shape.get("kv_source") is not None:
            mixer = replace(mixer, kv_source=shape["kv_source"])
        ffn = variants[shape["ffn_variant"]] if "ffn_variant" in shape else ffn
        layers.append(replace(layer, mixer=mixer, ffn=ffn))
    return replace(spec, layers=tuple(layers))


def _resized(linear: Any, rows: int | None = None, cols: int | None = None) -> Any:
    import torch  # heavy: only building a narrowed model needs it

    out_features = rows if rows is not None else linear.out_features
    in_features = cols if cols is not None else linear.in_features
    return torch.nn.Linear(in_features, out_features, bias=linear.bias is not None, dtype=linear.weight.dtype)


def narrow(model: Any, shapes: list[dict]) -> None:
    """Give each decoder layer's projections the recorded shapes (weights are loaded afterwards)."""
    from shrink.blockvariants import SharedKVAttention, ffn_variant, install_single_input_kv, mixer_variant  # heavy

    hidden, dtype = model.config.get_text_config().hidden_size, model.dtype
    sources = {shape["kv_source"] for shape in shapes if shape.get("kv_source") is not None}
    owners: dict[int, Any] = {}
    for index, (block, shape) in enumerate(zip(model.model.layers, shapes)):
        if "mixer_variant" in shape:
            block.self_attn = mixer_variant(shape["mixer_variant"], hidden, dtype, index)
        if "ffn_variant" in shape:
            block.mlp = ffn_variant(shape["ffn_variant"], hidden, dtype)
        if shape["ffn"] is not None:
            mlp = blocks.mlp(block)
            if hasattr(mlp, "gate_proj"):
                mlp.gate_proj = _resized(mlp.gate_proj, rows=shape["ffn"])
            mlp.up_proj = _resized(mlp.up_proj, rows=shape["ffn"])
            mlp.down_proj = _resized(mlp.down_proj, cols=shape["ffn"])
            if hasattr(mlp, "intermediate_size"):
                mlp.intermediate_size = shape["ffn"]
        if shape["heads"] is not None:
            attn = blocks.attention(block)
            head_dim = attn.head_dim
            q, kv = shape["heads"] * head_dim, shape["kv_heads"] * head_dim
            attn.q_proj = _resized(attn.q_proj, rows=q)
            attn.k_proj = _resized(attn.k_proj, rows=kv)
            attn.v_proj = _resized(attn.v_proj, rows=kv)
            attn.o_proj = _resized(attn.o_proj, cols=q)
            attn.num_key_value_groups = shape["heads"] // shape["kv_heads"]
        if index in sources:
            owners[index] = SharedKVAttention(blocks.attention(block))
            blocks.set_attention(block, owners[index])
        if shape.get("kv_source") is not None:
            blocks.set_attention(block, SharedKVAttention(blocks.attention(block), owners[shape["kv_source"]]))
    single = getattr(model.config.get_text_config(), SINGLE_INPUT_KV_KEY, None)
    if single is not None:
        install_single_input_kv(model, single)


def load_narrowed(location: str, config: Any, dtype: Any) -> Any:
    """Build the widest model from `config`, narrow it, then read the saved weights into it."""
    import torch  # heavy: only loading weights needs torch and transformers
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    narrow(model, shapes_of(config))
    state: dict = {}
    for file in sorted(Path(location).glob("*.safetensors")):
        state.update(load_file(str(file)))
    state = _renamed_to(model, state)
    missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise ShrinkError(f"The weights in '{location}' do not match their recorded layer shapes "
                          f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}).")
    model.tie_weights()
    return model.to(torch.device("cpu")).eval()


def _renamed_to(model: Any, state: dict) -> dict:
    """Checkpoint names as the model names them: some families save under another top-level prefix
    (Nemotron-H writes its decoder as `backbone.`, which from_pretrained maps back to `model.`)."""
    names = set(model.state_dict())
    by_rest = {name.split(".", 1)[1]: name for name in names if name.count(".") >= 2}
    return {key if key in names else by_rest.get(key.split(".", 1)[-1], key): value for key, value in state.items()}
