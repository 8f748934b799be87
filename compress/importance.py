"""Activation-based importance (Minitron): forward hooks over calibration batches, no gradients.

Scores per axis, each the root-mean-square of an activation over every calibration token:
- ffn: each FFN neuron's activation entering down_proj;
- heads: each attention head's output entering o_proj (ranked later within its KV group, so GQA
  structure survives); kv_groups: the sum of their heads' scores;
- ssm: each Mamba2 channel [heads, head_dim] entering out_proj (after the gated norm); heads are
  ranked within their SSM group and head_dim channels across all heads when pruning;
- hidden: each embedding channel at the output of every hidden-size norm, summed over layers;
- layers: Block Influence, 1 - cos(input, output) of each decoder layer (before the final norm).
A layer without a given unit (a Nemotron-H attention block has no FFN) has None for it. Covered:
Llama, Mistral, Qwen2/3, Gemma 3 and Nemotron-H (dense); others fail loudly.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from shrink import blocks
from shrink.archspec import AttentionSpec, SSMSpec
from shrink.compress.distill.parallel import World
from shrink.errors import ShrinkError
from shrink.model import weights_hash
from shrink.progress import ProgressLines
from shrink.storage import atomic_path, cache_dir

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "nemotron_h")
FIELDS = ("ffn", "heads", "ssm", "hidden", "layers", "tokens")
CACHE_VERSION = b"importance-v2"  # bumped when FIELDS change, so older cache files are not read


@dataclass
class Importance:
    ffn: list[Any] = field(default_factory=list)  # per layer: tensor [ffn width] or None
    heads: list[Any] = field(default_factory=list)  # per layer: tensor [num heads] or None
    hidden: Any = None  # tensor [hidden]
    layers: Any = None  # tensor [num layers], Block Influence
    tokens: int = 0
    ssm: list[Any] = field(default_factory=list)  # per layer: tensor [ssm heads, head_dim] or None

    def kv_groups(self, layer: int, num_kv_heads: int) -> Any:
        return self.heads[layer].view(num_kv_heads, -1).sum(-1)

    def ssm_heads(self, layer: int) -> Any:
        return self.ssm[layer].pow(2).sum(1).sqrt()

    def ssm_channels(self) -> Any:
        """head_dim channels scored over every head of every SSM layer: one choice for all of them,
        since head_dim is a single config value."""
        return sum(s.pow(2).sum(0) for s in self.ssm if s is not None).sqrt()


def _check_family(loaded: Any) -> None:
    if loaded.spec.family not in SUPPORTED_FAMILIES:
        raise ShrinkError(f"Importance scoring for '{loaded.spec.family}' is not written yet; supported: "
                          f"{', '.join(SUPPORTED_FAMILIES)}.")
    if any(layer.ffn is not None and layer.ffn.is_moe for layer in loaded.spec.layers):
        raise ShrinkError("Pruning a model with MoE layers is not written yet (expert widths and counts); "
                          "dense models only.")


def score(loaded: Any, batches: Any, batch_size: int = 4, current: World = World()) -> Importance:
    """Run the calibration sequences [n, seq_len] through the model once, collecting every axis. Under
    torchrun (`current` with several processes) each process runs every size-th batch and the sums
    (float64) are added over the processes: the single-process scores, to rounding, in 1/size the time."""
    import torch

    _check_family(loaded)
    model, spec = loaded.model.eval(), loaded.spec
    layers = model.model.layers
    sums_ffn = [_zeros(layer.ffn.width) if layer.ffn is not None else None for layer in spec.layers]
    sums_heads = [_zeros(layer.mixer.num_heads) if isinstance(layer.mixer, AttentionSpec) else None
                  for layer in spec.layers]
    sums_ssm = [_zeros(layer.mixer.num_heads, layer.mixer.head_dim) if isinstance(layer.mixer, SSMSpec) else None
                for layer in spec.layers]
    sums_hidden = _zeros(spec.hidden_size)
    influence = _zeros(len(layers))
    handles = []

    def channel_hook(total, shape):
        # sum of squares over batch and sequence, then over any trailing dims `total` does not keep
        def hook(_module, args):
            x = args[0].detach().double()
            squares = x.view(*x.shape[:-1], *shape).pow(2).sum(dim=(0, 1))
            total.add_(squares.view(*total.shape, -1).sum(-1))
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
        mixer = spec.layers[i].mixer
        if sums_ffn[i] is not None:
            handles.append(blocks.mlp(block).down_proj.register_forward_pre_hook(channel_hook(sums_ffn[i], (-1,))))
        if sums_heads[i] is not None:
            hook = channel_hook(sums_heads[i], (-1, mixer.head_dim))
            handles.append(blocks.attention(block).o_proj.register_forward_pre_hook(hook))
        if sums_ssm[i] is not None:
            hook = channel_hook(sums_ssm[i], (mixer.num_heads, mixer.head_dim))
            handles.append(blocks.ssm(block).out_proj.register_forward_pre_hook(hook))
        handles += [norm.register_forward_hook(hidden_hook) for norm in blocks.hidden_norms(block)]
        handles.append(block.register_forward_hook(block_hook(i)))
    starts = list(range(0, batches.shape[0], batch_size))[current.rank::current.size]
    try:
        with torch.no_grad(), ProgressLines("importance scoring", len(starts), "batch") as lines:
            for start in starts:
                model(batches[start:start + batch_size])
                lines.advance()
    finally:
        for handle in handles:
            handle.remove()
    for sums in (*sums_ffn, *sums_heads, *sums_ssm, sums_hidden, influence):
        if sums is not None:
            current.sum(sums)
    tokens = batches.numel()
    if tokens == 0:
        raise ShrinkError("No calibration tokens: the importance pass needs at least one sequence.")
    _check_finite(sums_ffn, sums_heads, sums_ssm, sums_hidden, influence)

    def rms(sums):
        return [(s / tokens).sqrt().float() if s is not None else None for s in sums]

    return Importance(ffn=rms(sums_ffn), heads=rms(sums_heads), ssm=rms(sums_ssm),
                      hidden=(sums_hidden / tokens).sqrt().float(), layers=(influence / tokens).float(), tokens=tokens)


def _check_finite(ffn: list, heads: list, ssm: list, hidden: Any, influence: Any) -> None:
    """Name the first place (in layer order) where a calibration activation was NaN or infinite: a NaN
    or an overflow spreads into every sum after it, so the first is where it began."""
    import torch

    for i in range(len(influence)):
        for what, sums in (("attention heads' output entering o_proj", heads[i]), ("SSM output entering out_proj", ssm[i]),
                           ("FFN activation entering down_proj", ffn[i])):
            if sums is not None and not bool(torch.isfinite(sums).all()):
                raise ShrinkError(f"Calibration activations are NaN or infinite at layer {i}'s {what}, so importance "
                                  "cannot be scored: the model overflows in float32 on this text or its weights are damaged.")
        if not bool(torch.isfinite(influence[i])):
            raise ShrinkError(f"Calibration activations are NaN or infinite at the output of layer {i}, so importance "
                              "cannot be scored: the model overflows in float32 on this text or its weights are damaged.")
    if not bool(torch.isfinite(hidden).all()):
        raise ShrinkError("Calibration activations are NaN or infinite at a hidden-size norm, so importance cannot be "
                          "scored: the model overflows in float32 on this text or its weights are damaged.")


def _zeros(*shape: int) -> Any:
    import torch

    return torch.zeros(*shape, dtype=torch.float64)


def layer_kl_scores(loaded: Any, batches: Any, batch_size: int = 4, current: World = World()) -> Any:
    """Second depth criterion: the KL(full || without layer i) on the calibration data, per layer.
    One extra pass per layer; a layer whose removal barely moves the output distribution is the one
    to drop (higher score = more important, as with Block Influence). Under torchrun each process
    scores every size-th layer."""
    import torch
    import torch.nn.functional as F

    _check_family(loaded)
    model = loaded.model.eval()
    layers = model.model.layers

    def logprobs() -> list[Any]:
        with torch.no_grad():
            return [F.log_softmax(model(batches[s:s + batch_size]).logits.double(), -1)
                    for s in range(0, batches.shape[0], batch_size)]

    scores = torch.zeros(len(layers), dtype=torch.float64)
    mine = list(range(len(layers)))[current.rank::current.size]
    with ProgressLines("layer KL scoring", len(mine) + 1, "pass") as lines:
        reference = logprobs()
        lines.advance()
        for i in mine:
            block = layers[i]
            handle = block.register_forward_hook(lambda _m, args, _out: args[0])  # the layer becomes identity
            try:
                skipped = logprobs()
            finally:
                handle.remove()
            total = sum(float((ref.exp() * (ref - out)).sum(-1).sum()) for ref, out in zip(reference, skipped))
            scores[i] = total / batches.numel()
            lines.advance()
    return current.sum(scores).float()


def cached_score(loaded: Any, batches: Any, batch_size: int = 4, current: World = World()) -> Importance:
    """`score`, cached on disk by the model's weights and the calibration tokens, so several prune
    targets (or a --search over them) reuse one pass. Under torchrun the pass is split (`score`) and
    rank 0 writes the cache while the others wait."""
    import torch


    digest = hashlib.sha256(CACHE_VERSION + weights_hash(loaded.model).encode() + batches.contiguous().numpy().tobytes()).hexdigest()[:24]
    path = cache_dir("importance") / f"{digest}.pt"
    if current.from_main(path.is_file()):  # every process takes the same path (the pass is a collective)
        data = torch.load(path, weights_only=True)
        return Importance(**{name: data[name] for name in FIELDS})
    importance = score(loaded, batches, batch_size, current)
    if current.is_main:
        with atomic_path(path) as tmp:
            torch.save({name: getattr(importance, name) for name in FIELDS}, tmp)
    current.barrier()  # no process reads a cache rank 0 is still writing
    return importance
