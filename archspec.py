"""ArchSpec: a typed, per-layer description of a causal language model, with no weights.

Everything downstream that reasons about a model's shape (the roofline estimator, memory reports,
pruning plans, exporters choosing a GGUF architecture) reads an ArchSpec, never a torch module. A
layer is a token mixer (attention, a Mamba2 SSM, or none) followed by an FFN (dense, MoE, or none),
so a hybrid such as Nemotron-H, whose blocks hold either a mixer or an FFN, fits the same shape.
Per-layer fields make non-uniform models (pruned, Puzzle-searched) first-class.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from shrink.errors import ShrinkError
from shrink.numformats import get_format
from shrink.typecheck import accepts, is_plain


@dataclass(frozen=True)
class AttentionSpec:
    num_heads: int
    num_kv_heads: int
    head_dim: int
    sliding_window: int | None = None  # None: attends to the whole context
    kv_source: int | None = None  # layer whose KV cache this layer reads; None: its own
    qk_norm: bool = False  # per-head RMSNorm on q and k (Gemma3, Qwen3)
    qkv_bias: bool = False
    o_bias: bool = False

    @property
    def owns_kv(self) -> bool:
        return self.kv_source is None

    def params(self, hidden: int) -> int:
        q = self.num_heads * self.head_dim
        kv = self.num_kv_heads * self.head_dim if self.owns_kv else 0
        n = hidden * (q + 2 * kv) + q * hidden
        if self.qkv_bias:
            n += q + 2 * kv
        if self.o_bias:
            n += hidden
        if self.qk_norm:
            n += 2 * self.head_dim
        return n


@dataclass(frozen=True)
class SSMSpec:
    """A Mamba2 mixer: heads of head_dim channels, B/C shared within each of num_groups groups."""

    num_heads: int
    head_dim: int
    num_groups: int
    state_size: int
    conv_kernel: int
    proj_bias: bool = False
    conv_bias: bool = True

    @property
    def inner(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def conv_dim(self) -> int:
        return self.inner + 2 * self.num_groups * self.state_size

    @property
    def in_proj_out(self) -> int:
        # z (gate), x, B, C and dt, projected together
        return self.inner + self.conv_dim + self.num_heads

    def params(self, hidden: int) -> int:
        n = hidden * self.in_proj_out + self.inner * hidden
        if self.proj_bias:
            n += self.in_proj_out + hidden
        n += self.conv_dim * self.conv_kernel + (self.conv_dim if self.conv_bias else 0)
        n += 3 * self.num_heads  # dt_bias, A_log, D
        n += self.inner  # gated RMSNorm before out_proj
        return n


@dataclass(frozen=True)
class FFNSpec:
    """A dense FFN (num_experts == 0) or a mixture of experts of that shape."""

    kind: Literal["gated", "mlp"]  # gated: gate/up/down (SwiGLU, GeGLU); mlp: up/down
    width: int  # intermediate size (of each expert for MoE)
    bias: bool = False
    num_experts: int = 0
    experts_per_token: int = 0
    shared_width: int = 0  # width of an always-active shared expert; 0: none

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def matrices(self) -> int:
        return 3 if self.kind == "gated" else 2

    def _mlp_params(self, hidden: int, width: int) -> int:
        n = self.matrices * hidden * width
        if self.bias:
            n += (self.matrices - 1) * width + hidden
        return n

    def params(self, hidden: int) -> int:
        if not self.is_moe:
            return self._mlp_params(hidden, self.width)
        experts = self.num_experts * self.matrices * hidden * self.width
        router = self.num_experts * hidden
        shared = self._mlp_params(hidden, self.shared_width) if self.shared_width else 0
        return experts + router + shared


@dataclass(frozen=True)
class LinearSpec:
    """A single hidden x hidden map standing in for a mixer or an FFN (a Puzzle variant): linear
    attention is W_o·W_v (each token attending only to itself), a linear FFN W_down·W_up. It holds
    no KV cache and no state."""

    kind: Literal["linear"] = "linear"

    def params(self, hidden: int) -> int:
        return hidden * hidden


@dataclass(frozen=True)
class LayerSpec:
    mixer: AttentionSpec | SSMSpec | LinearSpec | None
    ffn: FFNSpec | LinearSpec | None
    norms: int  # hidden-sized norm weight vectors in this block (Llama 2, Gemma3 4, Nemotron-H 1)

    @property
    def mixer_kind(self) -> Literal["attention", "ssm", "linear", "none"]:
        if isinstance(self.mixer, AttentionSpec):
            return "attention"
        if isinstance(self.mixer, SSMSpec):
            return "ssm"
        if isinstance(self.mixer, LinearSpec):
            return "linear"
        return "none"

    @property
    def dense_ffn(self) -> FFNSpec | None:
        """The FFN when it is a dense (non-MoE) FFNSpec; None for no FFN, a linear map or an MoE."""
        return self.ffn if isinstance(self.ffn, FFNSpec) and not self.ffn.is_moe else None

    def params(self, hidden: int) -> int:
        n = self.norms * hidden
        if self.mixer is not None:
            n += self.mixer.params(hidden)
        if self.ffn is not None:
            n += self.ffn.params(hidden)
        return n


@dataclass(frozen=True)
class Formats:
    """Number format per tensor group, by name from shrink.numformats."""

    weights: str = "bf16"  # linear layers of every block
    embeddings: str = "bf16"  # token embedding (and a tied lm_head)
    activations: str = "bf16"
    kv_cache: str = "bf16"
    ssm_state: str = "fp32"
    other: str = "bf16"  # norms, biases, SSM scalars, conv weights: small, kept in high precision
    lm_head: str | None = None  # the output projection when stored apart from the embedding; None: as embeddings
    # per operator (attn.qkv, attn.o, ffn.up, ffn.down, ssm.in_proj, ...): a stored format other than `weights`
    ops: tuple[tuple[str, str], ...] = ()

    @property
    def output(self) -> str:
        return self.lm_head or self.embeddings

    def validated(self) -> Formats:
        names = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("lm_head", "ops")}
        return Formats(**{k: get_format(v).name for k, v in names.items()},
                       lm_head=get_format(self.lm_head).name if self.lm_head else None,
                       ops=tuple(sorted((op, get_format(name).name) for op, name in dict(self.ops).items())))


@dataclass(frozen=True)
class ParamCounts:
    embedding: int  # token embedding plus an untied lm_head
    non_embedding: int
    total: int


@dataclass(frozen=True)
class ArchSpec:
    family: str
    vocab_size: int
    hidden_size: int
    tied_embeddings: bool
    layers: tuple[LayerSpec, ...]
    formats: Formats = field(default_factory=Formats)
    final_norm: bool = True
    max_position_embeddings: int | None = None
    name: str = ""
    # SwiftKV's SingleInputKV: the attention layers from this index on take K/V from one extra norm of
    # this layer's input, so the prompt runs only the layers before it (and the last token all of them)
    single_input_kv: int | None = None
    # which prompt positions a prefill projects onto the vocabulary: "last" (what generation needs, and
    # llama.cpp computes) or "all" (an ONNX graph exported with every position's logits)
    prompt_logits: str = "last"

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        """True when every layer of the same mixer kind has the same shape."""
        by_kind: dict[str, LayerSpec] = {}
        for layer in self.layers:
            first = by_kind.setdefault(layer.mixer_kind, layer)
            if _shape_key(first) != _shape_key(layer):
                return False
        return True

    def param_counts(self) -> ParamCounts:
        embedding = self.vocab_size * self.hidden_size * (1 if self.tied_embeddings else 2)
        non_embedding = sum(layer.params(self.hidden_size) for layer in self.layers)
        if self.final_norm:
            non_embedding += self.hidden_size
        if self.single_input_kv is not None:  # its K/V input norm
            non_embedding += self.hidden_size
        return ParamCounts(embedding, non_embedding, embedding + non_embedding)

    def with_formats(self, **changes: str) -> ArchSpec:
        return replace(self, formats=replace(self.formats, **changes).validated())

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArchSpec:
        if not isinstance(data, dict) or not isinstance(data.get("layers"), (list, tuple)) or \
                not all(isinstance(layer, dict) for layer in data["layers"]):
            raise ShrinkError("An ArchSpec is a JSON object whose 'layers' is a list of layer objects.")
        data = dict(data)
        layers = tuple(_layer_from_dict(layer) for layer in data.pop("layers"))
        formats = data.pop("formats", {})
        if not isinstance(formats, dict) or not isinstance(formats.get("ops", []), (list, tuple)) or \
                not all(isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) for x in p)
                        for p in formats.get("ops", [])):
            raise ShrinkError("An ArchSpec's 'formats' is an object whose 'ops' is a list of [operator, format] pairs.")
        formats = _strict(Formats, formats, "formats")
        formats = replace(formats, ops=tuple(tuple(pair) for pair in formats.ops)).validated()  # JSON gives lists
        spec = _strict(cls, {**data, "layers": layers, "formats": formats}, "ArchSpec")
        if spec.prompt_logits not in ("last", "all"):
            raise ShrinkError(f"ArchSpec.prompt_logits is 'last' or 'all', not {spec.prompt_logits!r}.")
        if spec.single_input_kv is not None and spec.single_input_kv >= spec.num_layers:
            raise ShrinkError(f"ArchSpec.single_input_kv is a layer index below {spec.num_layers}, "
                              f"not {spec.single_input_kv}.")
        return spec


def _shape_key(layer: LayerSpec) -> tuple:
    # A sliding window or a KV-sharing map does not change weight shapes, so it does not make a
    # model non-uniform for exporters.
    mixer = layer.mixer
    if isinstance(mixer, AttentionSpec):
        mixer = replace(mixer, sliding_window=None, kv_source=None)
    return (mixer, layer.ffn, layer.norms)


def _strict(cls: type, data: dict[str, Any], where: str):
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise ShrinkError(f"Unknown key(s) {sorted(unknown)} in {where}; known keys: {sorted(known)}.")
    try:
        made = cls(**data)
    except TypeError as err:
        raise ShrinkError(f"Incomplete {where}: {err}.") from None
    for f in fields(cls):  # JSON can hold any type: check the plain ones against their annotations
        value = getattr(made, f.name)
        if is_plain(f.type) and (not accepts(value, f.type) or
                                 (isinstance(value, (int, float)) and not isinstance(value, bool) and value < 0)):
            raise ShrinkError(f"{where}.{f.name} must be a non-negative {f.type}, not {value!r}.")
    return made


def _layer_from_dict(data: dict[str, Any]) -> LayerSpec:
    if any(not isinstance(data.get(k), (dict, type(None))) for k in ("mixer", "ffn")):
        raise ShrinkError("An ArchSpec layer's 'mixer' and 'ffn' are objects (or null).")
    mixer = data.get("mixer")
    if mixer is not None:
        mixer_cls = LinearSpec if mixer.get("kind") == "linear" else SSMSpec if "state_size" in mixer else AttentionSpec
        mixer = _strict(mixer_cls, mixer, mixer_cls.__name__)
    ffn = data.get("ffn")
    if ffn is not None:
        ffn_cls = LinearSpec if ffn.get("kind") == "linear" else FFNSpec
        ffn = _strict(ffn_cls, ffn, ffn_cls.__name__)
    return _strict(LayerSpec, {**data, "mixer": mixer, "ffn": ffn}, "LayerSpec")
