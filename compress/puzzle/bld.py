"""Blockwise local distillation (Puzzle §3): every variant learns to reproduce its parent sub-block's
output from the parent's own input (teacher forcing), with loss MSE(parent, child) / MSE(parent, 0).

One pass of the parent over the calibration sequences records, per layer, what enters the layer and
what its attention and its FFN add to the residual stream (each measured with the family's own
decoder layer, the other sub-block switched off, so norms and residual conventions are the family's).
Attention and FFN variants train decoupled on that one stream. Each trained variant is written to
`out/<layer>-<sub>-<name>.safetensors` as soon as it finishes, so a killed run resumes where it
stopped. Under torchrun each process trains a disjoint share of the variants (ddp), or, for blocks
whose training state outgrows one process, every process trains every variant with its state sharded
by FSDP2 and each step's sequences split (fsdp).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from shrink import blocks
from shrink.compress.distill.parallel import World, choose_parallel, shard_module, world
from shrink.compress.puzzle.library import Variant, build
from shrink.errors import ShrinkError
from shrink.progress import ProgressLines
from shrink.storage import atomic_path, atomic_write_text


@dataclass(frozen=True)
class BLDConfig:
    steps: int = 60  # optimizer steps per variant over the cached stream
    lr: float = 1e-3  # Puzzle trains blocks at a higher rate than global distillation
    batch_size: int = 4  # sequences per step
    seed: int = 0
    # under torchrun: ddp, each process trains whole variants, a disjoint share of them; fsdp, every process
    # trains every variant together, its weights, gradients and optimizer state sharded (FSDP2) and each
    # step's sequences split (for blocks whose training state outgrows one process); auto: fsdp when the
    # largest block's training state would take over a quarter of one process's memory
    parallel: str = "auto"


@dataclass
class LayerStream:
    """Per calibration batch: the layer's input, its call's keyword arguments, and the deltas its
    attention and its FFN add to the residual stream."""
    inputs: list[Any]
    kwargs: list[dict]
    attention: list[Any]
    ffn: list[Any]


@contextlib.contextmanager
def swapped(block: Any, attention: Any = None, ffn: Any = None) -> Iterator[Any]:
    """`block` with its attention and/or FFN module temporarily replaced."""
    saved = {name: getattr(block, name) for name, new in (("self_attn", attention), ("mlp", ffn)) if new is not None}
    for name, new in (("self_attn", attention), ("mlp", ffn)):
        if new is not None:
            setattr(block, name, new)
    try:
        yield block
    finally:
        for name, module in saved.items():
            setattr(block, name, module)


def _output(result: Any) -> Any:
    return result[0] if isinstance(result, tuple) else result


def branch(block: Any, sub: str, module: Any, x: Any, kwargs: dict, layer_idx: int) -> Any:
    """What `module` standing in as the block's `sub` adds to the residual stream at input x."""
    from shrink.blockvariants import NoOpFFN, NoOpMixer

    other = {"ffn": NoOpFFN()} if sub == "attention" else {"attention": NoOpMixer(layer_idx)}
    with swapped(block, **{sub: module}, **other):
        return _output(block(x, **kwargs)) - x


def layer_inputs(model: Any, ids: Any) -> tuple[list[tuple[Any, dict]], Any]:
    """(input, call keyword arguments) of every decoder layer for `ids`, and the decoder's final hidden
    state (after its norm), from one forward pass without gradients."""
    import torch

    seen: list[tuple[Any, dict]] = []

    def record(_module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        seen.append((x, {k: v for k, v in kwargs.items() if k != "hidden_states"}))

    handles = [layer.register_forward_pre_hook(record, with_kwargs=True) for layer in model.model.layers]
    try:
        with torch.no_grad():
            final = model.model(ids, use_cache=False).last_hidden_state
    finally:
        for handle in handles:
            handle.remove()
    return seen, final


def capture(model: Any, sequences: Any, batch_size: int) -> list[LayerStream]:
    """Run the parent once over `sequences`, recording every layer's stream."""
    import torch

    layers = model.model.layers
    streams = [LayerStream([], [], [], []) for _ in layers]
    with torch.no_grad():
        for start in range(0, sequences.shape[0], batch_size):
            inputs, _ = layer_inputs(model, sequences[start:start + batch_size])
            for i, (layer, (x, kwargs), stream) in enumerate(zip(layers, inputs, streams)):
                attention = branch(layer, "attention", blocks.attention(layer), x, kwargs, i)
                ffn = branch(layer, "ffn", blocks.mlp(layer), x + attention, kwargs, i)
                stream.inputs.append(x)
                stream.kwargs.append(kwargs)
                stream.attention.append(attention)
                stream.ffn.append(ffn)
    return streams


def normalized_mse(child: Any, parent: Any) -> Any:
    return (child - parent).pow(2).mean() / parent.pow(2).mean().clamp_min(1e-12)


def variant_file(out: Path, layer_idx: int, variant: Variant) -> Path:
    return out / f"{layer_idx:03d}-{variant.sub}-{variant.name}.safetensors"


def _batch_input(stream: LayerStream, sub: str, b: int) -> Any:
    return stream.inputs[b] if sub == "attention" else stream.inputs[b] + stream.attention[b]


def evaluate(block: Any, module: Any, variant: Variant, stream: LayerStream, layer_idx: int) -> float:
    """Normalized MSE of `module` as the block's sub-block over the whole stream."""
    import torch

    with torch.no_grad():
        target = stream.attention if variant.sub == "attention" else stream.ffn
        err = sum(float((branch(block, variant.sub, module, _batch_input(stream, variant.sub, b), stream.kwargs[b],
                                layer_idx) - target[b]).pow(2).sum()) for b in range(len(target)))
        return err / max(sum(float(t.pow(2).sum()) for t in target), 1e-12)


def _rows(value: Any, rows: Any, batch: int) -> Any:
    """`value` (a layer call's argument) restricted to the sequences `rows` of a batch of `batch`:
    tensors of two or more dimensions whose first is the batch are sliced (hidden states, masks,
    position embeddings; a 1-D cache_position is per position, never per sequence), containers are
    walked, the rest is shared (what broadcasts over a batch of one)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value[rows] if value.dim() >= 2 and value.shape[0] == batch and batch > 1 else value
    if isinstance(value, dict):
        return {k: _rows(v, rows, batch) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, rows, batch) for v in value)
    return value


def train_variant(block: Any, module: Any, variant: Variant, stream: LayerStream, layer_idx: int,
                  config: BLDConfig, current: World = World()) -> list[float]:
    """Train `module` in place on the stream; returns the loss of every step. With several processes
    (`module` sharded by FSDP2) each process takes its share of each step's sequences; the loss is
    scaled so that the gradients FSDP2 averages are those of the whole batch's normalized MSE."""
    import torch

    target = stream.attention if variant.sub == "attention" else stream.ffn
    module.train()
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.95), weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    generator = torch.Generator().manual_seed(config.seed + layer_idx)
    losses = []
    for _ in range(config.steps):
        b = int(torch.randint(len(target), (1,), generator=generator))
        whole = target[b]
        rows = current.shard(list(range(whole.shape[0])))
        # a process with no sequence in this batch runs one at weight 0: FSDP2's collectives need every process
        weight = 1.0 if rows else 0.0
        rows = rows or [0]
        x = _rows(_batch_input(stream, variant.sub, b), rows, whole.shape[0])
        child = branch(block, variant.sub, module, x, _rows(stream.kwargs[b], rows, whole.shape[0]), layer_idx)
        # this share's squared error over the whole batch's normalizer: the shares add up to normalized_mse
        loss = weight * (child - whole[rows]).pow(2).sum() / whole.numel() / whole.pow(2).mean().clamp_min(1e-12)
        total = current.sum(loss.detach().double())  # every process decides on the same number
        if not torch.isfinite(total):
            raise ShrinkError(f"Blockwise distillation of layer {layer_idx}'s {variant.sub} variant '{variant.name}' "
                              f"produced a non-finite loss; lower the learning rate.")
        optimizer.zero_grad(set_to_none=True)
        (loss * current.size).backward()  # FSDP2 averages gradients over the processes
        optimizer.step()
        schedule.step()
        losses.append(float(total))
    module.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def run(loaded: Any, sequences: Any, library: list[list[Variant]], importance: Any, out: Path,
        config: BLDConfig = BLDConfig(), current: World | None = None, status=lambda message: None) -> dict:
    """Train every variant that has something to learn; returns {layer: {variant key: normalized MSE}}
    for every variant (the parent 0, a no-op 1 by definition). Variants already on disk are loaded,
    not retrained. Under torchrun each process trains every size-th variant, then reads the others'."""
    model = loaded.model.eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:  # the parent is only read; given back as it came
        p.requires_grad_(False)
    try:
        return _run(loaded, sequences, library, importance, out, config, current, status)
    finally:
        for p in trainable:
            p.requires_grad_(True)


def _run(loaded: Any, sequences: Any, library: list[list[Variant]], importance: Any, out: Path, config: BLDConfig,
         current: World | None, status) -> dict:
    import torch

    model = loaded.model
    out.mkdir(parents=True, exist_ok=True)
    current = current or world()
    jobs = [(i, v) for i, variants in enumerate(library) for v in variants if v.trained]
    # every process reads the same files (the processes share `out`, as they do to read each other's variants)
    finished = _finished_errors(out, jobs)
    if finished is not None:  # a rerun (or a planned run's puzzle step) has nothing to record or train
        return _untrained_errors(library, finished)
    status(f"Recording the parent's block inputs and outputs on {sequences.numel():,} tokens")
    streams = capture(model, sequences, config.batch_size)
    sharded = choose_parallel(config.parallel, max(map(_size, model.model.layers)), current) == "fsdp"
    if sharded:  # every process trains every variant, sharded
        return _kept_errors(out, _run_sharded(loaded, streams, library, jobs, importance, out, config, current), current)
    mine = [job for n, job in enumerate(jobs) if n % current.size == current.rank]
    errors: dict[int, dict[str, float]] = {i: {} for i in range(len(library))}
    torch.manual_seed(config.seed)
    with ProgressLines("blockwise distillation", len(mine), "variant") as progress:
        for i, variant in mine:
            errors[i][variant.key] = _trained(loaded, streams[i], i, variant, importance, out, config)
            progress.advance()
    current.barrier()  # every share is on disk: read the other processes' variants
    for i, variant in jobs:
        if variant.key not in errors[i]:
            errors[i][variant.key] = _trained(loaded, streams[i], i, variant, importance, out, config)
    return _kept_errors(out, _untrained_errors(library, errors), current)


ERRORS_FILE = "errors.json"  # every trained variant's normalized MSE, written once all of them are on disk


def _kept_errors(out: Path, errors: dict[int, dict[str, float]], current: World) -> dict:
    if current.is_main:
        atomic_write_text(out / ERRORS_FILE, json.dumps({str(i): errs for i, errs in errors.items()}, indent=1))
    return errors


def _finished_errors(out: Path, jobs: list) -> dict[int, dict[str, float]] | None:
    """The errors of a finished run, when it covered every one of `jobs` and their weights are on disk."""
    path = out / ERRORS_FILE
    if not path.is_file():
        return None
    errors = {int(i): errs for i, errs in json.loads(path.read_text()).items()}
    if all(v.key in errors.get(i, {}) and variant_file(out, i, v).exists() for i, v in jobs):
        return errors
    return None


def _size(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


def _untrained_errors(library: list[list[Variant]], errors: dict[int, dict[str, float]]) -> dict:
    for i, variants in enumerate(library):
        for v in variants:
            if not v.trained:
                errors[i][v.key] = 0.0 if v.name == "parent" else 1.0
    return errors


def _run_sharded(loaded: Any, streams: list[LayerStream], library: list[list[Variant]], jobs: list, importance: Any,
                 out: Path, config: BLDConfig, current: World) -> dict:
    """BLD with each variant sharded by FSDP2 over every process; rank 0 writes each finished variant."""
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    errors: dict[int, dict[str, float]] = {i: {} for i in range(len(library))}
    torch.manual_seed(config.seed)
    with ProgressLines("blockwise distillation (sharded)", len(jobs), "variant") as progress:
        for i, variant in jobs:
            path = variant_file(out, i, variant)
            if not current.from_main(path.exists()):
                layer = loaded.model.model.layers[i]
                module = _built(loaded, i, variant, importance)
                shard_module(module, current)
                losses = train_variant(layer, module, variant, streams[i], i, config, current)
                full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                if current.is_main:
                    _write_variant(path, losses, full, config)
                del module, full
                current.barrier()  # every process reads the variant rank 0 has just written
            errors[i][variant.key] = _trained(loaded, streams[i], i, variant, importance, out, config)
            progress.advance()
    return _untrained_errors(library, errors)


def _trained(loaded: Any, stream: LayerStream, i: int, variant: Variant, importance: Any, out: Path,
             config: BLDConfig) -> float:
    """Train one variant (or load it when a previous run finished it); its normalized MSE."""
    from safetensors.torch import load_file

    layer = loaded.model.model.layers[i]
    module = _built(loaded, i, variant, importance)
    path = variant_file(out, i, variant)
    if path.exists():
        module.load_state_dict(load_file(str(path)))
    else:
        _write_variant(path, train_variant(layer, module, variant, stream, i, config), module.state_dict(), config)
    return evaluate(layer, module, variant, stream, i)


def _write_variant(path: Path, losses: list[float], weights: dict, config: BLDConfig) -> None:
    """The losses first: the weights file is what marks the variant finished (a resumed run skips it)."""
    from safetensors.torch import save_file

    atomic_write_text(path.with_suffix(".json"), json.dumps({"losses": losses, "config": asdict(config)}))
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp))


def load_variant(loaded: Any, layer_idx: int, variant: Variant, out: Path, importance: Any) -> Any:
    """The variant's module with its trained weights (the parent's own module for `parent`)."""
    from safetensors.torch import load_file

    module = _built(loaded, layer_idx, variant, importance)
    if variant.trained:
        path = variant_file(out, layer_idx, variant)
        if not path.exists():
            raise ShrinkError(f"The trained weights of layer {layer_idx}'s {variant.sub} variant '{variant.name}' are "
                              f"missing from '{out}'; run blockwise distillation again.")
        module.load_state_dict(load_file(str(path)))
    return module


def _built(loaded: Any, i: int, variant: Variant, importance: Any) -> Any:
    """The variant's module initialised from the parent's layer i (before any training)."""
    return build(loaded.model.model.layers[i], loaded.spec.layers[i], variant, i,
                 importance.ffn[i] if importance else None)
