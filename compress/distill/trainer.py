"""The distillation trainer: one loop for every student (pruned, later fake-quantized), with
checkpoints that make an interrupted run resume exactly where it stopped.

Batch order is a function of the step number and the seed, the RNG state and TAID's state go into
the checkpoint, and checkpoints are written atomically: killing the process at any point and
resuming gives the same weights as an uninterrupted run.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shrink.compress.distill.losses import TAIDState, get_loss, topk_forward_kl
from shrink.errors import ShrinkError
from shrink.storage import atomic_directory, atomic_write_text

CHECKPOINT = "checkpoint"


@dataclass(frozen=True)
class DistillConfig:
    loss: str = "forward_kl"  # forward_kl | reverse_kl | jsd | skew_kl | taid
    temperature: float = 1.0
    lr: float = 1e-5
    weight_decay: float = 0.0
    batch_size: int = 4
    steps: int = 100
    top_k: int = 64
    ce_weight: float = 0.0  # optional cross-entropy on the real next tokens
    checkpoint_every: int = 25
    seed: int = 0


@dataclass
class DistillReport:
    steps: int
    tokens: int
    losses: list[float] = field(default_factory=list)
    eval_kl_before: float = 0.0
    eval_kl_after: float = 0.0
    resumed_from: int = 0


def _dense_teacher(values: Any, indices: Any, vocab: int) -> Any:
    """Full-vocabulary teacher logits from its top-k: the rest far below the smallest kept logit, so
    they carry (almost) no probability, as the top-k cache assumes."""

    floor = values.min(dim=-1, keepdim=True).values - 30.0
    dense = floor.expand(*values.shape[:-1], vocab).clone()
    return dense.scatter(-1, indices.long(), values)


def _batch_rows(step: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Rows of the step-th batch: epochs are seeded permutations, so order depends only on the step."""
    per_epoch = max(1, n // batch_size)
    epoch, within = divmod(step, per_epoch)
    order = list(range(n))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    return order[within * batch_size:(within + 1) * batch_size]


def _loss(config: DistillConfig, student_logits: Any, values: Any, indices: Any, ids: Any, taid_state: TAIDState) -> Any:
    import torch.nn.functional as F

    if config.loss == "forward_kl":
        loss = topk_forward_kl(student_logits, values.float(), indices.long(), config.temperature)
    else:
        teacher = _dense_teacher(values.float(), indices, student_logits.shape[-1])
        fn = get_loss(config.loss)
        loss = fn(student_logits, teacher, taid_state, config.temperature) if config.loss == "taid" else \
            fn(student_logits, teacher, config.temperature)
    if config.ce_weight:
        ce = F.cross_entropy(student_logits[:, :-1].reshape(-1, student_logits.shape[-1]), ids[:, 1:].reshape(-1))
        loss = loss + config.ce_weight * ce
    return loss


def evaluate_kl(student: Any, sequences: Any, values: Any, indices: Any, batch_size: int = 4) -> float:
    """Mean forward KL(teacher top-k || student) on held-out sequences."""
    import torch

    student.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, sequences.shape[0], batch_size):
            rows = slice(start, start + batch_size)
            logits = student(sequences[rows]).logits.float()
            total += topk_forward_kl(logits, values[rows].float(), indices[rows].long()).item() * logits.shape[0]
            count += logits.shape[0]
    return total / max(count, 1)


def distill(student: Any, train: Any, train_topk: tuple[Any, Any], config: DistillConfig, out: str | Path,
            evaluation: Any = None, eval_topk: tuple[Any, Any] | None = None, progress: Any = None,
            stop_after: int | None = None) -> DistillReport:
    """Train `student` (a transformers model, changed in place) towards the cached teacher."""
    import torch

    if config.steps < 1 or config.batch_size < 1:
        raise ShrinkError("Distillation needs at least one step and a batch size of at least 1.")
    get_loss(config.loss)  # unknown loss names fail before any work
    out = Path(out)
    values, indices = train_topk
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    taid_state = TAIDState()
    report = DistillReport(steps=config.steps, tokens=0)
    if evaluation is not None:
        report.eval_kl_before = evaluate_kl(student, evaluation, *eval_topk)
    start = _resume(out / CHECKPOINT, student, optimizer, taid_state, report, config)
    if start == 0:
        torch.manual_seed(config.seed)  # a resumed run continues from the checkpoint's RNG state instead
    student.train()
    for step in range(start, config.steps):
        rows = _batch_rows(step, train.shape[0], config.batch_size, config.seed)
        ids = train[rows]
        logits = student(ids).logits.float()
        loss = _loss(config, logits, values[rows], indices[rows], ids, taid_state)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        report.losses.append(loss.item())
        report.tokens += ids.numel()
        if config.loss == "taid":
            taid_state.update(loss.item())
        if progress is not None:
            progress(step + 1, loss.item())
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save_checkpoint(out / CHECKPOINT, student, optimizer, taid_state, report, config, done)
        if stop_after is not None and done >= stop_after:
            return report  # used by tests to simulate a killed run
    student.eval()
    if evaluation is not None:
        report.eval_kl_after = evaluate_kl(student, evaluation, *eval_topk)
    return report


def _save_checkpoint(path: Path, student: Any, optimizer: Any, taid_state: TAIDState, report: DistillReport,
                     config: DistillConfig, step: int) -> None:
    import torch
    from safetensors.torch import save_model

    with atomic_directory(path) as tmp:
        save_model(student, str(tmp / "student.safetensors"))  # handles tied (shared) tensors
        torch.save({"optimizer": optimizer.state_dict(), "rng": torch.get_rng_state()}, tmp / "state.pt")
        atomic_write_text(tmp / "progress.json", json.dumps({
            "step": step, "config": asdict(config), "taid": taid_state.to_dict(),
            "losses": report.losses, "tokens": report.tokens,
        }))


def _resume(path: Path, student: Any, optimizer: Any, taid_state: TAIDState, report: DistillReport,
            config: DistillConfig) -> int:
    import torch
    from safetensors.torch import load_model

    progress_file = path / "progress.json"
    if not progress_file.is_file():
        return 0
    saved = json.loads(progress_file.read_text())
    if saved["config"] != asdict(config):
        raise ShrinkError(f"The checkpoint in '{path}' was made with other settings; use another output directory "
                          "or the same settings to resume.")
    load_model(student, str(path / "student.safetensors"), strict=True)
    state = torch.load(path / "state.pt", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng"])
    for key, value in saved["taid"].items():
        setattr(taid_state, key, value)
    report.losses = saved["losses"]
    report.tokens = saved["tokens"]
    report.resumed_from = saved["step"]
    return saved["step"]
