"""PTQ then optional QAD of a loaded model, measured before and after: what `shrink quantize` and the
recipe's quantize step share. The student is changed in place and left holding its on-grid weights
and the plan, ready to save and export."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from shrink.compress.distill.parallel import World, world
from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.quant.plan import KEEP_DEFAULT, make_plan
from shrink.compress.quant.ptq import calibrate
from shrink.compress.quant.student import fake_quantize, materialize
from shrink.errors import ShrinkError
from shrink.progress import ProgressLines

# default QAD peak learning rate by the grid's bits per element. Adam moves every weight by about
# lr per step whatever its gradient, so a grid with finer steps needs a smaller lr for the student to
# stay near its PTQ start. 4-bit: 1e-5 took the Q4_0 export from KL 0.620 to 0.439 in llama.cpp; 8-bit:
# at 1e-5 an AWQ Q8_0 student went from 0.069 to 0.165, 1e-7 came from a sweep on the earlier
# renormalised KL (benchmarks/qad_lr.py; rerun it on the exact KL); 2- and 1-bit: not swept yet.
QAD_LR = {8: 1e-7, 4: 1e-5, 2: 1e-5, 1: 1e-5}


def qad_lr(grid: str) -> float:
    from shrink.numformats.grids import weight_format

    bits = weight_format(grid).element_bits
    return QAD_LR[min((b for b in QAD_LR if b >= bits), default=max(QAD_LR))]


@dataclass(frozen=True)
class QuantizeSettings:
    # no defaults for what a user chooses: flows/defaults.py holds them, once
    format: str
    runtime: str
    calibration: str
    qad: bool
    tokens: int
    batch_size: int = 4  # the trainer's batch, as DistillConfig's
    lr: float | None = None  # None: qad_lr(grid)
    keep: tuple[str, ...] | None = None
    activations: str | None = None
    parallel: str = "auto"  # QAD under torchrun: ddp, fsdp or auto (compress/distill/parallel.py)
    precision: str = "fp32"  # QAD's: fp32, or bf16 autocast (FSDP2 gathers weights in bf16)
    activation_checkpointing: bool = False  # QAD recomputes each layer's activations in the backward pass


def quantize_model(student: Any, teacher: Any, split: Any, settings: QuantizeSettings, checkpoints: Path,
                   train: Callable[..., Any] | None = None, status: Callable[[str], None] = lambda message: None,
                   after_ptq: Callable[[Any, Any], None] | None = None, current: World | None = None) -> dict:
    """Plan, calibrate and fake-quantize `student` (a LoadedModel), optionally distill it towards
    `teacher` (a LoadedModel) on its logits, and materialize the on-grid weights; returns the report.
    `train(model, split, train_topk, eval_topk, config, checkpoints, label=...)` runs the distillation
    (default: the trainer without a progress display). `after_ptq(model, plan)` sees the fake-quantized
    PTQ student before QAD changes it (the benchmark exports it from there). Under torchrun every
    process calibrates the same student (deterministic), the teacher pass and QAD are split over the
    processes (settings.parallel) and every process ends with the same weights."""
    from shrink.compress.distill.evaluate import evaluate
    from shrink.compress.distill.trainer import DistillConfig

    plan = make_plan(student.model, settings.format, settings.runtime, settings.keep or KEEP_DEFAULT,
                     settings.activations)
    seq_len = split.train.shape[1]
    steps = max(1, settings.tokens // (settings.batch_size * seq_len))
    lr = qad_lr(plan.grid) if settings.lr is None else settings.lr
    config = DistillConfig(lr=lr, steps=steps, batch_size=settings.batch_size, checkpoint_every=max(1, steps // 4),
                           parallel=settings.parallel, precision=settings.precision,
                           activation_checkpointing=settings.activation_checkpointing)
    config.check()
    current = current or world()
    status("Caching the teacher's top-k logits")
    eval_topk = teacher_topk(teacher.model, split.evaluation, current=current)
    train_topk = teacher_topk(teacher.model, split.train, current=current) if settings.qad else None
    started = time.perf_counter()
    status(f"PTQ calibration ({settings.calibration})")
    calibration = calibrate(student.model, plan, settings.calibration, split.calibration, student.spec.family,
                            progress=status)
    fake_quantize(student.model, plan)
    ptq = evaluate(student.model, split.evaluation, *eval_topk).to_dict()
    if after_ptq:
        after_ptq(student.model, plan)
    report, kept = None, "ptq"
    if settings.qad:
        train = train or plain_train
        ptq_weights = {k: v.detach().clone() for k, v in student.model.state_dict().items()}
        report = train(student.model, split, train_topk, eval_topk, config, checkpoints, label="QAD")
        # only rank 0 evaluates after training; every rank keeps what it decides
        if current.from_main(current.is_main and report.eval_after["kl"] < ptq["kl"]):
            kept = "qad"
        else:  # QAD did not help (a fine grid moves under a too-large step): never ship the worse student
            student.model.load_state_dict(ptq_weights)
        del ptq_weights
    seconds = time.perf_counter() - started
    materialize(student.model, plan)
    return {
        "format": settings.format, "runtime": settings.runtime, "grid": plan.grid,
        "quantized_weights": sum(_weight(student, t).numel() for t in plan.tensors),
        "effective_bits_per_quantized_weight": mean_bits(student, plan),
        "fallbacks": [vars(t) for t in plan.fallbacks], "kept_high_precision": plan.kept,
        "calibration": calibration, "ptq": ptq, "kept": kept, "data": split.source, "seconds": seconds, "measured": True,
        "qad": None if report is None else {"tokens": report.tokens, "steps": report.steps, "lr": lr,
                                            "after": report.eval_after, "tokens_per_second": report.tokens_per_second,
                                            "parallel": report.parallel, "processes": report.processes},
    }


def _weight(loaded: Any, tensor: Any) -> Any:
    return loaded.model.get_submodule(tensor.module).weight


def mean_bits(loaded: Any, plan: Any) -> float:
    """Effective bits per quantized weight (scales included), weighted by tensor size."""
    from shrink.numformats.grids import effective_bits

    weights = [_weight(loaded, t) for t in plan.tensors]
    total = sum(w.numel() for w in weights)
    if not total:
        raise ShrinkError("The plan quantizes no weight.")
    return sum(effective_bits(t.grid, tuple(w.shape)) * w.numel() for t, w in zip(plan.tensors, weights)) / total


def plain_train(model, split, train_topk, eval_topk, config, checkpoints, label="QAD"):
    """The trainer with progress only as lines where stderr is not a terminal (shrink.progress)."""
    from shrink.compress.distill.trainer import distill

    with ProgressLines(label, config.steps, "step") as lines:
        return distill(model, split.train, train_topk, config, checkpoints, split.evaluation, eval_topk,
                       progress=lambda step, loss, speed: lines.update(step, f"loss {loss:.4f}, {speed:,.0f} tok/s"))
