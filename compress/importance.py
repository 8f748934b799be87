"""Activation-based importance (Minitron): forward hooks over calibration batches, no gradients.

Scores per axis, each the root-mean-square of an activation over every calibration token:
- ffn: each FFN neuron's activation entering down_proj;
- heads: each attention head's output entering o_proj (ranked later within its KV group, so GQA
  structure survives); kv_groups: the sum of their heads' scores;
- hidden: each embedding channel at the output of every hidden-size norm, summed over layers;
- layers: Block Influence, 1 - cos(input, output) of each decoder layer (before the final norm).
Decoder families with Llama-style module names are covered (Llama, Mistral, Qwen2/3, Gemma 3);
others fail loudly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from shrink.errors import ShrinkError

DECODER_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


@dataclass
class Importance:
    ffn: list[Any] = field(default_factory=list)  # per layer: tensor [ffn width]
    heads: list[Any] = field(default_factory=list)  # per layer: tensor [num heads]
    hidden: Any = None  # tensor [hidden]
    layers: Any = None  # tensor [num layers], Block Influence
    tokens: int = 0

    def kv_groups(self, layer: int, num_kv_heads: int) -> Any:
        return self.heads[layer].view(num_kv_heads, -1).sum(-1)


def _check_family(loaded: Any) -> None:
    if loaded.spec.family not in DECODER_FAMILIES:
        raise ShrinkError(f"Importance scoring for '{loaded.spec.family}' is not written yet; supported: "
                          f"{', '.join(DECODER_FAMILIES)}.")


def _norms(block: Any) -> list[Any]:
    names = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
    return [getattr(block, n) for n in names if hasattr(block, n)]


def score(loaded: Any, batches: Any, batch_size: int = 4) -> Importance:
    """Run the calibration sequences [n, seq_len] through the model once, collecting every axis."""
    import torch

    _check_family(loaded)
    model, spec = loaded.model.eval(), loaded.spec
    layers = model.model.layers
    sums_ffn = [torch.zeros(layer.ffn.width, dtype=torch.float64) for layer in spec.layers]
    sums_heads = [torch.zeros(layer.mixer.num_heads, dtype=torch.float64) for layer in spec.layers]
    sums_hidden = torch.zeros(spec.hidden_size, dtype=torch.float64)
    influence = torch.zeros(len(layers), dtype=torch.float64)
    handles = []

    def ffn_hook(i):
        def hook(_module, args):
            sums_ffn[i].add_(args[0].detach().double().pow(2).sum(dim=(0, 1)))
        return hook

    def head_hook(i, head_dim):
        def hook(_module, args):
            x = args[0].detach().double()
            sums_heads[i].add_(x.view(*x.shape[:-1], -1, head_dim).pow(2).sum(dim=(0, 1, 3)))
        return hook

    def hidden_hook(_module, _args, output):
        sums_hidden.add_(output.detach().double().pow(2).sum(dim=(0, 1)))

    def block_hook(i):
        def hook(_module, args, output):
            hidden_in = args[0] if args else None
            hidden_out = output[0] if isinstance(output, tuple) else output
            cos = torch.nn.functional.cosine_similarity(hidden_in.double(), hidden_out.double(), dim=-1)
            influence[i] += (1 - cos).sum()
        return hook

    for i, block in enumerate(layers):
        handles.append(block.mlp.down_proj.register_forward_pre_hook(ffn_hook(i)))
        handles.append(block.self_attn.o_proj.register_forward_pre_hook(head_hook(i, spec.layers[i].mixer.head_dim)))
        handles += [norm.register_forward_hook(hidden_hook) for norm in _norms(block)]
        handles.append(block.register_forward_hook(block_hook(i)))
    tokens = 0
    try:
        with torch.no_grad():
            for start in range(0, batches.shape[0], batch_size):
                chunk = batches[start:start + batch_size]
                model(chunk)
                tokens += chunk.numel()
    finally:
        for handle in handles:
            handle.remove()
    if tokens == 0:
        raise ShrinkError("No calibration tokens: the importance pass needs at least one sequence.")
    return Importance(
        ffn=[(s / tokens).sqrt().float() for s in sums_ffn],
        heads=[(s / tokens).sqrt().float() for s in sums_heads],
        hidden=(sums_hidden / tokens).sqrt().float(),
        layers=(influence / tokens).float(),
        tokens=tokens,
    )


def layer_kl_scores(loaded: Any, batches: Any, batch_size: int = 4) -> Any:
    """Second depth criterion: the KL(full || without layer i) on the calibration data, per layer.
    One extra pass per layer; a layer whose removal barely moves the output distribution is the one
    to drop (higher score = more important, as with Block Influence)."""
    import torch
    import torch.nn.functional as F

    _check_family(loaded)
    model = loaded.model.eval()
    layers = model.model.layers

    def logprobs() -> list[Any]:
        with torch.no_grad():
            return [F.log_softmax(model(batches[s:s + batch_size]).logits.double(), -1)
                    for s in range(0, batches.shape[0], batch_size)]

    reference = logprobs()
    scores = torch.zeros(len(layers), dtype=torch.float64)
    for i, block in enumerate(layers):
        handle = block.register_forward_hook(lambda _m, args, _out: args[0])  # the layer becomes identity
        try:
            skipped = logprobs()
        finally:
            handle.remove()
        total = sum(float((ref.exp() * (ref - out)).sum(-1).sum()) for ref, out in zip(reference, skipped))
        scores[i] = total / batches.numel()
    return scores.float()


def cached_score(loaded: Any, batches: Any, batch_size: int = 4) -> Importance:
    """`score`, cached on disk by the model's weights and the calibration tokens, so several prune
    targets (or a --search over them) reuse one pass."""
    import hashlib

    import torch

    from shrink.model import weights_hash
    from shrink.storage import atomic_path, cache_dir

    digest = hashlib.sha256(weights_hash(loaded.model).encode() + batches.contiguous().numpy().tobytes()).hexdigest()[:24]
    path = cache_dir("importance") / f"{digest}.pt"
    if path.is_file():
        data = torch.load(path, weights_only=True)
        return Importance(ffn=data["ffn"], heads=data["heads"], hidden=data["hidden"], layers=data["layers"],
                          tokens=int(data["tokens"]))
    importance = score(loaded, batches, batch_size)
    with atomic_path(path) as tmp:
        torch.save({"ffn": importance.ffn, "heads": importance.heads, "hidden": importance.hidden,
                    "layers": importance.layers, "tokens": importance.tokens}, tmp)
    return importance
