"""Operator costs: FLOPs and bytes moved for one forward pass of an ArchSpec, with no weights.

One pass processes `new` tokens per sequence for `batch` sequences whose caches already hold
`past` tokens: prefill is (new=prompt, past=0), a decode step is (new=1, past=context).
Conventions, chosen to match how inference runtimes execute (llama.cpp, FlashAttention-style
kernels) and stated once here:
- A matmul reads its weights once per pass and its input/output activations once.
- Attention reads each layer's K and V once per pass (fused kernel: scores are never written to
  memory) over the positions it may see: all of them, or the last `sliding_window`; it reads KV
  heads, not query heads (GQA). A layer that shares another layer's KV cache computes no K/V and
  writes no cache, but still reads the cache it attends to.
- lm_head runs only for the last position of each sequence (what generation needs), unless the spec
  says its prefill projects every prompt position (`prompt_logits` "all": an ONNX graph exported so).
- MoE weight traffic counts the experts a pass is expected to touch under uniform routing.
- A Mamba2 scan reads and writes its fp32 state once per pass.
- SingleInputKV (SwiftKV, `spec.single_input_kv` = k): every pass runs one more norm (of layer k's
  input, for the later layers' K/V); a prefill runs the prompt through the layers before k, the
  prompt's other tokens through the K/V projections (and key norms) of the owning layers from k on,
  written to their caches, and the last token through every layer from k on (`prefill_ops`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import lru_cache

from shrink.archspec import ArchSpec, AttentionSpec, FFNSpec, LayerSpec, LinearSpec, SSMSpec
from shrink.numformats import get_format, matmul_compute_class


@dataclass(frozen=True)
class Op:
    name: str  # e.g. "attn.qkv"; the same name in every layer so reports can group by it
    kind: str  # matmul | attention | ssm | norm | embedding
    flops: float
    bytes: float
    compute: str  # compute class whose peak bounds it
    weights: float = 0.0  # the share of `bytes` that is stored weights (a matmul's matrix)
    weight_format: str | None = None  # the format those weights are stored in (registry or mixture name)
    outputs: float = 0.0  # elements a matmul writes (tokens x output features): each is one reduction
    rows: float = 0.0  # weight rows a matmul streams (output features; once per pass, whatever the tokens)


@dataclass(frozen=True)
class _Bytes:
    """Bytes per element of each tensor group, from the spec's formats."""

    weight: float
    embedding: float
    lm_head: float
    act: float
    kv: float
    state: float
    other: float
    matmul_class: str
    lm_head_class: str
    attention_class: str
    weight_format: str = ""
    lm_head_format: str = ""
    op_weights: tuple[tuple[str, float, str, str], ...] = ()  # per-operator (name, bytes per weight, class, format)

    def of(self, op: str) -> tuple[float, str, str]:
        """(bytes per weight, compute class, format name) of an operator's weights."""
        return next(((w, c, f) for name, w, c, f in self.op_weights if name == op),
                    (self.weight, self.matmul_class, self.weight_format))


def _bytes_of(spec: ArchSpec) -> _Bytes:
    f = spec.formats
    act = get_format(f.activations)

    def of(name: str) -> tuple[float, str, str]:
        fmt = get_format(name)
        return fmt.bytes_per_element, matmul_compute_class(fmt, act), fmt.name

    weights, output = of(f.weights), of(f.output)
    return _Bytes(
        weight=weights[0],
        embedding=get_format(f.embeddings).bytes_per_element,
        lm_head=output[0],
        act=act.bytes_per_element,
        kv=get_format(f.kv_cache).bytes_per_element,
        state=get_format(f.ssm_state).bytes_per_element,
        other=get_format(f.other).bytes_per_element,
        matmul_class=weights[1],
        lm_head_class=output[1],
        attention_class=matmul_compute_class(get_format(f.kv_cache), act),
        weight_format=weights[2],
        lm_head_format=output[2],
        op_weights=tuple((op, *of(name)) for op, name in f.ops),
    )


def _matmul(name: str, tokens: int, d_in: int, d_out: int, b: _Bytes, weight_bytes: float | None = None,
            weight_of: str | None = None) -> Op:
    """A matmul's op; its weights are costed in the format of operator `weight_of` (default: `name`)."""
    per_weight, compute, fmt = b.of(weight_of or name)
    elements = d_in * d_out if weight_bytes is None else weight_bytes
    weights = elements * per_weight
    return Op(name, "matmul", 2.0 * tokens * d_in * d_out, weights + tokens * (d_in + d_out) * b.act, compute,
              weights, fmt, float(tokens * d_out), elements / d_in)


def _norm(name: str, tokens: int, width: int, count: int, b: _Bytes) -> Op:
    # square, mean, rsqrt-scale, weight multiply: ~4 FLOPs per element; read and write once
    return Op(name, "norm", 4.0 * tokens * width * count, count * (2 * tokens * width * b.act + width * b.other), "fp32")


def visible_positions(past: int, new: int, window: int | None) -> int:
    """Sum over the `new` query positions of how many key positions each may attend to."""
    if window is None:
        return new * past + new * (new + 1) // 2
    total = 0
    # positions p = past+1 .. past+new see min(p, window) keys
    first, last = past + 1, past + new
    below = max(0, min(last, window) - first + 1)  # positions that see all p keys
    if below:
        total += (first + first + below - 1) * below // 2
    total += (new - below) * window
    return total


def attention_ops(a: AttentionSpec, hidden: int, batch: int, new: int, past: int, b: _Bytes) -> list[Op]:
    tokens = batch * new
    q_width = a.num_heads * a.head_dim
    kv_width = a.num_kv_heads * a.head_dim
    own_kv = 2 * kv_width if a.owns_kv else 0
    ops = [_matmul("attn.qkv", tokens, hidden, q_width + own_kv, b)]
    if a.qk_norm:
        ops.append(_norm("attn.qk_norm", tokens, q_width + kv_width, 1, b))
    seen = visible_positions(past, new, a.sliding_window)
    cached = min(past + new, a.sliding_window or past + new)  # KV positions a kernel must read
    flops = batch * seen * a.num_heads * (4.0 * a.head_dim + 5.0)  # QK^T, PV, softmax
    kv_read = batch * cached * 2 * kv_width * b.kv
    kv_write = batch * new * 2 * kv_width * b.kv if a.owns_kv else 0.0
    q_and_out = 2 * tokens * q_width * b.act
    ops.append(Op("attn.sdpa", "attention", flops, kv_read + kv_write + q_and_out, b.attention_class))
    ops.append(_matmul("attn.o", tokens, q_width, hidden, b))
    return ops


def ssm_ops(s: SSMSpec, hidden: int, batch: int, new: int, b: _Bytes) -> list[Op]:
    tokens = batch * new
    conv_state = batch * s.conv_dim * (s.conv_kernel - 1) * b.act
    state = batch * s.inner * s.state_size * b.state
    return [
        _matmul("ssm.in_proj", tokens, hidden, s.in_proj_out, b),
        Op(
            "ssm.conv",
            "ssm",
            2.0 * tokens * s.conv_dim * s.conv_kernel,
            s.conv_dim * s.conv_kernel * b.other + 2 * tokens * s.conv_dim * b.act + 2 * conv_state,
            "fp32",
        ),
        # per token and state element: decay, input outer product, readout (~6 FLOPs)
        Op(
            "ssm.scan",
            "ssm",
            6.0 * tokens * s.inner * s.state_size,
            2 * state + tokens * (s.conv_dim + s.num_heads + 2 * s.inner) * b.act,
            "fp32",
        ),
        _norm("ssm.gated_norm", tokens, s.inner, 1, b),
        _matmul("ssm.out_proj", tokens, s.inner, hidden, b),
    ]


def ffn_ops(f: FFNSpec, hidden: int, tokens: int, b: _Bytes) -> list[Op]:
    up_width = (f.matrices - 1) * f.width
    if not f.is_moe:
        return [_matmul("ffn.up", tokens, hidden, up_width, b), _matmul("ffn.down", tokens, f.width, hidden, b)]
    # Expected distinct experts touched by `tokens` tokens each choosing k of E (uniform routing).
    touched = f.num_experts * (1 - (1 - f.experts_per_token / f.num_experts) ** tokens)
    routed = tokens * f.experts_per_token
    ops = [
        _matmul("moe.router", tokens, hidden, f.num_experts, b),
        _matmul("moe.experts_up", routed, hidden, up_width, b, weight_bytes=touched * hidden * up_width),
        _matmul("moe.experts_down", routed, f.width, hidden, b, weight_bytes=touched * f.width * hidden),
    ]
    if f.shared_width:
        shared = (f.matrices - 1) * f.shared_width
        ops += [
            _matmul("moe.shared_up", tokens, hidden, shared, b),
            _matmul("moe.shared_down", tokens, f.shared_width, hidden, b),
        ]
    return ops


# The operator whose weights a hidden x hidden map stands in for (its format and its name in reports).
LINEAR_MIXER_OP = "attn.o"
LINEAR_FFN_OP = "ffn.down"


@lru_cache(maxsize=4096)
def layer_ops(layer: LayerSpec, hidden: int, batch: int, new: int, past: int, b: _Bytes) -> tuple[Op, ...]:
    tokens = batch * new
    ops = [_norm("norm", tokens, hidden, layer.norms, b)]
    if isinstance(layer.mixer, AttentionSpec):
        ops += attention_ops(layer.mixer, hidden, batch, new, past, b)
    elif isinstance(layer.mixer, SSMSpec):
        ops += ssm_ops(layer.mixer, hidden, batch, new, b)
    elif isinstance(layer.mixer, LinearSpec):  # stored as attn_output, as llama.cpp's deci stores it
        ops.append(_matmul(LINEAR_MIXER_OP, tokens, hidden, hidden, b))
    if isinstance(layer.ffn, LinearSpec):
        ops.append(_matmul(LINEAR_FFN_OP, tokens, hidden, hidden, b))
    elif layer.ffn is not None:
        ops += ffn_ops(layer.ffn, hidden, tokens, b)
    return tuple(ops)


def model_edge_ops(spec: ArchSpec, batch: int, new: int, b: _Bytes) -> list[Op]:
    """Embedding lookup, final norm and lm_head (last position of each sequence, or every new one)."""
    tokens = batch * new
    h, v = spec.hidden_size, spec.vocab_size
    rows = tokens if spec.prompt_logits == "all" else batch
    return [
        Op("embedding", "embedding", float(tokens * h), tokens * h * (b.embedding + b.act), "fp32"),
        _norm("final_norm", rows, h, 1 if spec.final_norm else 0, b),
        Op("lm_head", "matmul", 2.0 * rows * h * v, h * v * b.lm_head + rows * (h + v) * b.act, b.lm_head_class,
           h * v * b.lm_head, b.lm_head_format, float(rows * v), float(v)),
    ]


SINGLE_INPUT_NORM = "swiftkv.norm"  # SingleInputKV's norm of layer k's input


def pass_ops(spec: ArchSpec, batch: int, new: int, past: int) -> list[Op]:
    """Every operator of one forward pass, layer by layer (identical layers are computed once)."""
    b = _bytes_of(spec)
    ops = [op for op in model_edge_ops(spec, batch, new, b) if op.name == "embedding"]
    for i, layer in enumerate(spec.layers):
        if i == spec.single_input_kv:
            ops.append(_norm(SINGLE_INPUT_NORM, batch * new, spec.hidden_size, 1, b))
        ops.extend(layer_ops(layer, spec.hidden_size, batch, new, past, b))
    ops.extend(op for op in model_edge_ops(spec, batch, new, b) if op.name != "embedding")
    return ops


def kv_fill_ops(a: AttentionSpec, hidden: int, tokens: int, b: _Bytes) -> list[Op]:
    """SingleInputKV's prompt work in a layer from k on that owns its cache: keys and values of `tokens`
    positions projected from the shared input (weights in the attn.qkv format), key-normed when the
    layer has q/k norms, and written to the cache; no queries, attention or FFN."""
    kv_width = a.num_kv_heads * a.head_dim
    project = _matmul("attn.kv", tokens, hidden, 2 * kv_width, b, weight_of="attn.qkv")
    ops = [replace(project, bytes=project.bytes + tokens * 2 * kv_width * b.kv)]
    if a.qk_norm:
        ops.append(_norm("attn.k_norm", tokens, kv_width, 1, b))
    return ops


def prefill_ops(spec: ArchSpec, batch: int, prompt: int) -> list[Op]:
    """The operators of a prompt's prefill: one pass of `prompt` tokens, or under SingleInputKV the
    prompt through the layers before k, its first prompt-1 tokens' K/V in the layers from k on, and
    the last token through those layers (what SwiftKV's runtime runs)."""
    k = spec.single_input_kv
    if k is None or prompt == 1:
        return pass_ops(spec, batch, prompt, 0)
    b, hidden = _bytes_of(spec), spec.hidden_size
    edges = model_edge_ops(spec, batch, prompt, b)  # embedding of every token, head of the last
    ops = [op for op in edges if op.name == "embedding"]
    for layer in spec.layers[:k]:
        ops.extend(layer_ops(layer, hidden, batch, prompt, 0, b))
    ops.append(_norm(SINGLE_INPUT_NORM, batch * prompt, hidden, 1, b))
    for layer in spec.layers[k:]:
        if isinstance(layer.mixer, AttentionSpec) and layer.mixer.owns_kv:
            ops.extend(kv_fill_ops(layer.mixer, hidden, batch * (prompt - 1), b))
        ops.extend(layer_ops(layer, hidden, batch, 1, prompt - 1, b))
    ops.extend(op for op in edges if op.name != "embedding")
    return ops


def linear_params_by_op(layer: LayerSpec, hidden: int) -> dict[str, int]:
    """Parameters held in matrices (what a weight format quantizes), by the operator that reads them;
    the rest are norms, biases, SSM scalars and conv taps, kept in the `other` format."""
    n: dict[str, int] = {}
    m = layer.mixer
    if isinstance(m, AttentionSpec):
        kv = 2 * m.num_kv_heads * m.head_dim if m.owns_kv else 0
        n["attn.qkv"] = hidden * (m.num_heads * m.head_dim + kv)
        n["attn.o"] = m.num_heads * m.head_dim * hidden
    elif isinstance(m, SSMSpec):
        n["ssm.in_proj"] = hidden * m.in_proj_out
        n["ssm.out_proj"] = m.inner * hidden
    elif isinstance(m, LinearSpec):
        n[LINEAR_MIXER_OP] = hidden * hidden
    f = layer.ffn
    if isinstance(f, LinearSpec):
        n[LINEAR_FFN_OP] = hidden * hidden
    elif f is not None and not f.is_moe:
        n["ffn.up"] = (f.matrices - 1) * hidden * f.width
        n["ffn.down"] = f.width * hidden
    elif f is not None:
        n["moe.router"] = f.num_experts * hidden
        n["moe.experts_up"] = (f.matrices - 1) * hidden * f.width * f.num_experts
        n["moe.experts_down"] = f.width * hidden * f.num_experts
        if f.shared_width:
            n["moe.shared_up"] = (f.matrices - 1) * hidden * f.shared_width
            n["moe.shared_down"] = f.shared_width * hidden
    return n


def linear_params(layer: LayerSpec, hidden: int) -> int:
    return sum(linear_params_by_op(layer, hidden).values())


def weight_bytes_by_group(spec: ArchSpec) -> dict[str, float]:
    """Bytes of every stored weight by group (blocks' matrices, embedding, a separate lm_head, the
    rest: norms, biases, SSM scalars), each operator's matrices in its own format."""
    b = _bytes_of(spec)
    table = spec.vocab_size * spec.hidden_size
    blocks = linear = 0
    for layer in spec.layers:
        for op, n in linear_params_by_op(layer, spec.hidden_size).items():
            blocks += n * b.of(op)[0]
            linear += n
    return {"blocks": blocks, "embedding": table * b.embedding,
            "lm_head": 0.0 if spec.tied_embeddings else table * b.lm_head,
            "other": (spec.param_counts().non_embedding - linear) * b.other}


def weight_bytes(spec: ArchSpec) -> float:
    return sum(weight_bytes_by_group(spec).values())
