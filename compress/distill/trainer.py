"""The distillation trainer: one loop for every student (pruned, later fake-quantized), with
checkpoints that make an interrupted run resume exactly where it stopped.

AdamW with linear warm-up and cosine decay, gradient clipping and accumulation, optional bf16
autocast, periodic held-out evaluation, and data parallelism under torchrun (compress/distill/
parallel.py). Batch order is a function of the step number and the seed; optimizer, schedule, RNG
and TAID state go into the checkpoint, written atomically: killing the process at any point and
resuming gives the same weights as an uninterrupted run. A NaN or exploding loss stops the run
before the bad step touches the weights, so the last checkpoint stays good.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import random
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

from shrink.allocator import return_freed_memory
from shrink.compress.distill.evaluate import evaluate
from shrink.compress.distill.chunked import StudentLoss
from shrink.compress.distill.losses import TAIDState, get_loss
from shrink.compress.distill.parallel import (World, check_parallel, check_precision, choose_parallel, fill_shards,
                                              meta_skeleton, shard, world, wrap)
from shrink.errors import ShrinkError
from shrink.storage import atomic_directory, atomic_write_text

CHECKPOINT = "checkpoint"
HOW_NOT_WHAT = ("logit_chunk", "activation_checkpointing", "parallel")  # settings a run may resume under changed


@dataclass(frozen=True)
class DistillConfig:
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | taid
    temperature: float = 1.0
    lr: float = 1e-4
    weight_decay: float = 0.0
    batch_size: int = 4  # sequences per optimizer step, over all ranks and micro-batches
    steps: int = 100
    top_k: int = 64
    ce_weight: float = 0.0  # optional cross-entropy on the real next tokens
    hidden_weight: float = 0.0  # optional hidden-state term (needs the live teacher)
    warmup_steps: int | None = None  # None: 10% of the steps
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    clip_norm: float = 1.0
    grad_accum: int = 1  # micro-batches per step (per rank)
    precision: str = "fp32"  # fp32 | bf16 (autocast)
    eval_every: int = 0  # 0: evaluate before and after only
    explode_factor: float = 10.0  # a step loss above this times the first step's stops the run
    checkpoint_every: int = 25
    seed: int = 0
    logit_chunk: int = 64  # positions per slice of the student's output projection in the loss; 0: full logits
    activation_checkpointing: bool = False  # recompute each layer's activations in the backward pass
    parallel: str = "auto"  # under torchrun: ddp (whole student per process), fsdp (sharded), auto: by size

    def check(self) -> None:
        get_loss(self.loss)  # unknown loss names fail before any work
        if self.steps < 1 or self.batch_size < 1 or self.grad_accum < 1:
            raise ShrinkError("Distillation needs at least one step, a batch size of at least 1 and --grad-accum >= 1.")
        check_precision(self.precision)
        check_parallel(self.parallel)
        if self.logit_chunk < 0:
            raise ShrinkError("--logit-chunk must be 0 (full logits) or a positive number of positions.")
        if self.lr <= 0 or self.clip_norm <= 0:
            raise ShrinkError("The learning rate and the clipping norm must be positive.")

    @property
    def warmup(self) -> int:
        return max(1, self.steps // 10) if self.warmup_steps is None else self.warmup_steps


@dataclass
class DistillReport:
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)
    eval_before: dict = field(default_factory=dict)  # {"kl": ..., "perplexity": ...}
    eval_after: dict = field(default_factory=dict)
    evals: list[dict] = field(default_factory=list)  # periodic: {"step", "kl", "perplexity"}
    resumed_from: int = 0
    tokens_per_second: float = 0.0  # measured over this process's steps
    parallel: str = "none"  # none (one process), ddp or fsdp
    processes: int = 1


def _lr_factor(config: DistillConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, config.steps - config.warmup)
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        return config.min_lr_ratio + (1 - config.min_lr_ratio) * cosine
    return factor


def _batch_rows(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Rows of the step-th batch: epochs are seeded permutations, so order depends only on the step."""
    per_epoch = max(1, n // batch_size)
    epoch, within = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order[within * batch_size:(within + 1) * batch_size]


def _micro_batches(rows: list[int], parts: int) -> list[list[int]]:
    size = math.ceil(len(rows) / parts)
    return [rows[i:i + size] for i in range(0, len(rows), size)]


def _device(current: World) -> Any:
    import torch

    if torch.cuda.is_available():
        return torch.device("cuda", current.rank % torch.cuda.device_count())
    return torch.device("cpu")


def distill(student: Any, train: Any, train_topk: tuple[Any, Any], config: DistillConfig, out: str | Path,
            evaluation: Any = None, eval_topk: tuple[Any, Any] | None = None, progress: Any = None,
            stop_after: int | None = None, teacher: Any = None, current: World | None = None) -> DistillReport:
    """Train `student` (a transformers model, changed in place) towards the cached teacher.

    `progress(step, loss, tokens_per_second)` is called after every step on rank 0. `teacher` (the
    live model) is needed only for the hidden-state term.
    """
    import torch

    config.check()
    if config.hidden_weight and teacher is None:
        raise ShrinkError("The hidden-state term needs the teacher model itself, not only its cached logits.")
    current = current or world()
    device = _device(current)
    mode = choose_parallel(config.parallel, sum(p.numel() for p in student.parameters()), current)
    # a process other than rank 0 may hold only the structure (model.load(weights=False)): then every
    # process trains sharded, from rank 0's weights, and that process ends as it came. Every process
    # takes the same mode: sharded when any of them arrived empty or chose it (`auto` reads each
    # process's own memory, which may differ between nodes)
    arrived_empty = any(p.is_meta for p in student.parameters())
    if arrived_empty and current.is_main:
        raise ShrinkError("Rank 0's student has no weights: it is the process every other one receives them from.")
    if current.size > 1:
        wants_shards = torch.tensor([float(arrived_empty or mode == "fsdp")], dtype=torch.float64)
        mode = "fsdp" if current.sum(wants_shards).item() else mode
    if mode == "fsdp" and config.hidden_weight:
        raise ShrinkError("The hidden-state term is not available with --parallel fsdp yet (its projection "
                          "would not be kept in step across the processes); use --parallel ddp or drop it.")
    if mode != "fsdp":  # under FSDP2 only each process's shards go to the device
        student.to(device)
    out = Path(out)
    values, indices = train_topk
    alignment = None
    if config.hidden_weight:
        from shrink.compress.distill.hidden import HiddenAlignment

        teacher.to(device).eval()
        alignment = HiddenAlignment(student.config.num_hidden_layers, teacher.config.num_hidden_layers,
                                    _width(student), _width(teacher)).to(device)
    taid_state = TAIDState()
    report = DistillReport(steps=config.steps, tokens=0)
    evaluating = evaluation is not None and current.is_main
    report.parallel, report.processes = mode, current.size
    if mode == "fsdp" and config.eval_every:
        raise ShrinkError("--eval-every is not available with --parallel fsdp yet; evaluation runs before and after.")
    if evaluating:
        if mode == "fsdp":  # evaluated on the device as after training; the shards are cut on the host
            report.eval_before = evaluate(student.to(device), evaluation, *eval_topk).to_dict()
            student.to("cpu")
        else:
            report.eval_before = evaluate(student, evaluation, *eval_topk).to_dict()
    trained, buffers = student, None
    if mode == "fsdp":  # a sharded copy trains; the caller's module waits on the meta device for the result
        buffers = {name: b.detach().clone() for name, b in student.named_buffers()}
        trained = meta_skeleton(student)  # never a second whole copy: shards are cut from the caller's weights
    loss_module = StudentLoss(trained, config, taid_state, config.logit_chunk)
    if mode == "fsdp":
        shard(loss_module, trained, current, config.precision)
        fill_shards(trained, student, device)
        student.to("meta")
    model = wrap(loss_module, current) if mode == "ddp" else loss_module
    state = torch.nn.Module()  # what a checkpoint holds: the student and the hidden-state projection
    state.student = trained
    if alignment is not None:
        state.alignment = alignment
    parameters = [p for p in state.parameters() if p.requires_grad]
    # fused: one pass over each tensor, no temporaries the size of the largest one (the vocabulary)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in parameters)
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(config))
    start = _resume(out / CHECKPOINT, state, optimizer, scheduler, taid_state, report, config)
    if start == 0:
        torch.manual_seed(config.seed)  # a resumed run continues from the checkpoint's RNG state instead
    if config.activation_checkpointing:
        trained.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return_freed_memory()
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if config.precision == "bf16" else nullcontext()
    trained.train()
    started, tokens_here = time.perf_counter(), 0
    for step in range(start, config.steps):
        rows = current.shard(_batch_rows(step, train.shape[0], config.batch_size, config.seed))
        optimizer.zero_grad(set_to_none=True)
        step_loss = torch.zeros((), dtype=torch.float64)
        micro = _micro_batches(rows, config.grad_accum)
        for m, chunk in enumerate(micro):
            ids = train[chunk].to(device)
            # DDP averages gradients over ranks: weight each micro-batch so the sum is the global mean
            weight = len(chunk) / config.batch_size * current.size
            last = m == len(micro) - 1
            if mode == "fsdp":
                model.set_requires_gradient_sync(last)
            sync = model.no_sync() if mode == "ddp" and not last else nullcontext()
            with sync:
                with autocast:
                    loss, hidden_states = model(ids, values[chunk].to(device), indices[chunk].to(device),
                                                output_hidden_states=alignment is not None, grad_scale=weight)
                if alignment is not None:
                    with torch.no_grad(), autocast:
                        reference = teacher(ids, output_hidden_states=True).hidden_states
                    loss = loss + config.hidden_weight * alignment(hidden_states, reference)
                (loss * weight).backward()
            step_loss += loss.detach().double().cpu() * weight / current.size
        if current.size > 1:
            import torch.distributed as dist

            dist.all_reduce(step_loss)
        grad_norm = torch.nn.utils.clip_grad_norm_(parameters, config.clip_norm)
        grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # a DTensor under FSDP
        _stop_if_diverged(step + 1, step_loss.item(), float(grad_norm), report, out / CHECKPOINT, config)
        optimizer.step()
        scheduler.step()
        report.losses.append(step_loss.item())
        report.tokens += config.batch_size * train.shape[1]
        tokens_here += config.batch_size * train.shape[1]
        report.tokens_per_second = tokens_here / (time.perf_counter() - started)
        if config.loss == "taid":
            taid_state.update(step_loss.item())
        done = step + 1
        if current.is_main and progress is not None:
            progress(done, step_loss.item(), report.tokens_per_second)
        if evaluating and config.eval_every and done % config.eval_every == 0 and done != config.steps:
            report.evals.append({"step": done, **evaluate(student, evaluation, *eval_topk).to_dict()})
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_checkpoint(out / CHECKPOINT, state, optimizer, scheduler, taid_state, report, config, done, current)
        if stop_after is not None and done >= stop_after:
            break  # used by tests to simulate a killed run
    current.barrier()  # no rank reads the final weights before rank 0 has written them
    if config.activation_checkpointing:
        trained.gradient_checkpointing_disable()
    optimizer.zero_grad(set_to_none=True)  # the last step's gradients are not needed by the evaluation
    if mode == "fsdp":
        _gather_into(student, trained, buffers, device, arrived_empty)
        del trained, loss_module, model, state, optimizer
    student.eval()
    if stop_after is not None and stop_after < config.steps:
        return report
    if evaluating:
        report.eval_after = evaluate(student, evaluation, *eval_topk).to_dict()
        report.evals.append({"step": config.steps, **report.eval_after})
    return report


def _width(model: Any) -> int:
    config = getattr(model.config, "text_config", None) or model.config
    return config.hidden_size


def _stop_if_diverged(step: int, loss: float, grad_norm: float, report: DistillReport, checkpoint: Path,
                      config: DistillConfig) -> None:
    first = report.losses[0] if report.losses else None
    # a KL under half a nat has not diverged, whatever its ratio to a near-zero first step
    exploded = first is not None and loss > max(config.explode_factor * first, 0.5)
    if math.isfinite(loss) and math.isfinite(grad_norm) and not exploded:
        return
    what = f"loss {loss:.4g}" + (f" (over {config.explode_factor:g}x the first step's {first:.4g})" if exploded else "")
    kept = (f"the last good checkpoint is kept in '{checkpoint}'" if (checkpoint / "progress.json").is_file()
            else "no checkpoint had been written yet")
    raise ShrinkError(f"Distillation diverged at step {step} ({what}, gradient norm {grad_norm:.4g}); {kept}; "
                      "lower --lr or --clip-norm and run again.")


def _save_checkpoint(path: Path, state: Any, optimizer: Any, scheduler: Any, taid_state: TAIDState,
                     report: DistillReport, config: DistillConfig, step: int, current: World) -> None:
    """Model and optimizer as a torch.distributed.checkpoint (each process writes its shards; any number
    of processes, sharded or not, reads it back), the rest as small files from rank 0; atomic."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optimizer_state = get_state_dict(state, optimizer)
    tmp = path.with_name(f".{path.name}.shards.tmp")  # a killed write leaves litter storage.remove_leftovers knows
    if current.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    current.barrier()
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp / "state"),
             no_dist=current.size == 1)
    current.barrier()
    if current.is_main:
        with atomic_directory(path) as final:
            os.replace(tmp / "state", final / "state")
            torch.save({"scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(), "processes": current.size},
                       final / "run.pt")
            atomic_write_text(final / "progress.json", json.dumps({
                "step": step, "config": asdict(config), "taid": taid_state.to_dict(),
                "losses": report.losses, "tokens": report.tokens, "evals": report.evals,
            }))
        shutil.rmtree(tmp, ignore_errors=True)
    current.barrier()


def _gather_into(student: Any, trained: Any, buffers: dict, device: Any, structure_only: bool) -> None:
    """The sharded copy's full weights into the caller's module (on the meta device while it trained);
    a process whose student came without weights takes part in the gathering and keeps none."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    # the gathering is one collective per tensor either way; cpu_offload keeps the result on rank 0 only
    full = get_model_state_dict(trained, options=StateDictOptions(full_state_dict=True, cpu_offload=structure_only))
    if structure_only:
        return
    student.to_empty(device=device)
    student.load_state_dict(full)
    for name, buffer in buffers.items():
        student.get_buffer(name).copy_(buffer)
    student.tie_weights()


def _result_settings(settings: dict) -> dict:
    """The settings that decide the weights: how the loss is sliced (or, later, sharded) does not."""
    return {k: v for k, v in settings.items() if k not in HOW_NOT_WHAT}


def _resume(path: Path, state: Any, optimizer: Any, scheduler: Any, taid_state: TAIDState, report: DistillReport,
            config: DistillConfig) -> int:
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    progress_file = path / "progress.json"
    if not progress_file.is_file():
        return 0
    saved = json.loads(progress_file.read_text())
    if _result_settings(saved["config"]) != _result_settings(asdict(config)):
        raise ShrinkError(f"The checkpoint in '{path}' was made with other settings; use another output directory "
                          "or the same settings to resume.")
    if not (path / "state").is_dir():
        raise ShrinkError(f"The checkpoint in '{path}' was written by an older shrink (no sharded state); use another "
                          "output directory.")
    model_state, optimizer_state = get_state_dict(state, optimizer)
    whole = {"model": model_state, "optimizer": optimizer_state}
    import torch.distributed as dist

    dcp.load(whole, checkpoint_id=str(path / "state"), no_dist=not (dist.is_available() and dist.is_initialized()))
    set_state_dict(state, optimizer, model_state_dict=whole["model"], optim_state_dict=whole["optimizer"])
    run = torch.load(path / "run.pt", weights_only=True)
    scheduler.load_state_dict(run["scheduler"])
    torch.set_rng_state(run["rng"])
    for key, value in saved["taid"].items():
        setattr(taid_state, key, value)
    report.losses = saved["losses"]
    report.tokens = saved["tokens"]
    report.evals = saved.get("evals", [])
    report.resumed_from = saved["step"]
    return saved["step"]
