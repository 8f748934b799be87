"""Disk and memory, checked before the expensive work: a run, a distillation or an export whose outputs
cannot fit on the output's filesystem, or whose working set cannot fit in this machine's memory, is
refused with both numbers instead of failing on a full disk or being killed by the kernel minutes later.

The needs are estimated from the ArchSpec and the steps, and are lower bounds (what the weights
alone take; activations other than the logits, Python and the runtimes come on top), so a refusal
means the work cannot fit. Models are loaded and saved in float32 (shrink.model), 4 bytes a
parameter; an artifact takes its format's bits per weight; training adds a gradient and AdamW's two
moments (12 bytes a trained parameter) and the logits of a batch.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shrink.archspec import ArchSpec
from shrink.errors import ShrinkError
from shrink.flows import defaults
from shrink.numformats.registry import get_format
from shrink.units import fmt_bytes

FLOAT32 = 4  # bytes a parameter of a loaded or saved model
TRAINING = 12  # gradient plus AdamW's two moments, float32, per trained parameter
LOGIT_COPIES = 3  # the logits, their log-softmax and its gradient: float32, batch x seq x vocab each
EXPORT_FORMATS = {"gguf": "f16", "onnx": "f32"}  # each backend's default --quant (export/*_backend.py)


@dataclass
class Needs:
    """Bytes the work writes (`disk`) and its largest working set in memory (`memory`), with the step
    that sets each."""
    disk: int = 0
    memory: int = 0
    memory_by: str = ""
    parts: list[str] = field(default_factory=list)

    def holds(self, memory: int, by: str) -> None:
        if memory > self.memory:
            self.memory, self.memory_by = int(memory), by


def free_disk(path: str | Path) -> int:
    """Free bytes on the filesystem that will hold `path` (its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def available_memory() -> int:
    """Memory a new allocation can have without swapping: MemAvailable where Linux reports it, else
    the physical memory."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _on_accelerator() -> bool:
    import torch  # heavy, and imported by the work this check precedes anyway

    return torch.cuda.is_available()


def _training(params: int, vocab: int, batch_size: int, seq_len: int) -> int:
    """Host memory of a student in training: its weights, and on the CPU also its gradient, AdamW's
    moments and a batch's logits (the trainer moves them to a GPU when there is one)."""
    if _on_accelerator():
        return params * FLOAT32
    return params * (FLOAT32 + TRAINING) + LOGIT_COPIES * FLOAT32 * batch_size * seq_len * vocab


def _artifact(params: int, quant: str) -> int:
    return int(params * get_format(quant).bytes_per_element)


def _export_bytes(params: int, fmt: str, quant: str | None) -> int:
    try:
        return _artifact(params, quant or EXPORT_FORMATS.get(fmt, "f16"))
    except ShrinkError:  # a family name (int4) or an unknown format, which the export names itself: its smallest
        return _artifact(params, "q4_0")


def export_needs(spec: ArchSpec, fmt: str, quant: str | None) -> Needs:
    """`shrink export`: the artifact on disk; the model and a float32 copy of its tensors beside it in memory."""
    params = spec.param_counts().total
    artifact = _export_bytes(params, fmt, quant)
    needs = Needs(disk=artifact, parts=[f"the {fmt} artifact {fmt_bytes(artifact)}"])
    needs.holds(2 * params * FLOAT32 + artifact, "export")
    return needs


def distill_needs(teacher: ArchSpec, student: ArchSpec, batch_size: int, seq_len: int) -> Needs:
    """`shrink distill`: the student and its checkpoint on disk; the teacher and the training student in memory."""
    params = student.param_counts().total
    needs = Needs(disk=params * (2 * FLOAT32 + 8), parts=[f"the student and its checkpoint {fmt_bytes(params * 16)}"])
    needs.holds(teacher.param_counts().total * FLOAT32 + _training(params, student.vocab_size, batch_size, seq_len),
                "distill")
    return needs


def run_needs(spec: ArchSpec, steps: list[tuple[str, Any]], seq_len: int = defaults.SEQ_LEN, done: int = 0) -> Needs:
    """What `steps` on the model of `spec` write (at the peak: every step's output, and the largest
    temporary file set, a checkpoint or llama.cpp's F16 source) and hold; the first `done` steps
    (finished before a --resume) only set the sizes they leave."""
    teacher = spec.param_counts().total
    embedding = spec.param_counts().embedding
    current, quantized = teacher, None
    needs, kept = Needs(), 0
    for index, (name, config) in enumerate(steps):
        writes = temporary = holds = 0
        if name == "prune":
            if getattr(config, "params", None) is not None:
                current = embedding + int(config.params * (current - embedding))
            writes, holds = current * FLOAT32, teacher * FLOAT32 + 2 * current * FLOAT32  # the model and its slice
        elif name == "trim-vocab":  # at most the model it starts from (its kept vocabulary is chosen later)
            writes, holds = current * FLOAT32, teacher * FLOAT32 + 2 * current * FLOAT32
        elif name in ("kv-share", "puzzle"):  # a transformed copy no larger than the model (a lower bound for
            # Puzzle, whose trained variants also stay on disk)
            writes, holds = current * FLOAT32, teacher * FLOAT32 + 2 * current * FLOAT32
        elif name in ("distill", "quantize", "single-input-kv"):
            writes, holds = current * FLOAT32, teacher * FLOAT32 + current * FLOAT32
            trains = name == "distill" or (name == "quantize" and config.qad) or (
                name == "single-input-kv" and config.tokens > 0)
            if trains:  # a checkpoint: the weights and AdamW's moments
                batch = getattr(config, "batch_size", defaults.BATCH_SIZE)
                temporary = current * (FLOAT32 + 8)
                holds = teacher * FLOAT32 + _training(current, spec.vocab_size, batch, seq_len)
            if name == "quantize":
                quantized = config.format
        elif name == "gguf-quantize":  # llama.cpp's quantizer reads an F16 GGUF of the model
            writes, temporary = _artifact(current, "q4_0"), current * 2
            holds = teacher * FLOAT32 + current * FLOAT32
        elif name == "export":
            writes = _export_bytes(current, config.format, config.quant or quantized)
            # the export holds the model and a float32 copy of its tensors while it writes
            holds = teacher * FLOAT32 + 2 * current * FLOAT32 + writes
        elif name == "verify":  # the reference is loaded afresh beside the teacher
            holds = 2 * teacher * FLOAT32 + _artifact(current, "q4_0")
        if index >= done:
            if writes or temporary:
                needs.parts.append(f"{name} {fmt_bytes(writes + temporary)}")
            needs.disk = max(needs.disk, kept + writes + temporary)
            kept += writes
        needs.holds(holds, name)
    return needs


def check(needs: Needs, output: str | Path, what: str) -> None:
    """Refuse `what` now when its outputs cannot fit on `output`'s filesystem or its working set in memory."""
    free = free_disk(output)
    if needs.disk > free:
        raise ShrinkError(f"{what} writes at least {fmt_bytes(needs.disk)} (estimated; {', '.join(needs.parts)}) "
                          f"but the filesystem of '{output}' has {fmt_bytes(free)} free; free some space or "
                          "choose another --output.")
    memory = available_memory()
    if needs.memory > memory:
        raise ShrinkError(f"{what} needs at least {fmt_bytes(needs.memory)} of memory (estimated, at its "
                          f"{needs.memory_by} step) but this machine has {fmt_bytes(memory)} available; use a "
                          "machine with more memory or a smaller model.")
