"""Which weight takes which grid: the quantization plan a student is trained on and exported with.

A user names a family of formats (`int4`, `nvfp4`, ...) and the runtime the export goes to; the plan
turns that into one concrete grid per Linear weight (`q4_0` for GGUF, `int4_g128` for PyTorch...),
so that the grid the student is fake-quantized on during distillation is exactly the one the export
packs. Kept in high precision by default (overridable by module-name pattern):
- the token embedding and the lm_head: at low bits the vocabulary projection dominates the loss for
  a small share of the time. A GGUF file stores them on Q8_0, so for GGUF the student holds them on
  that grid too (frozen during QAD);
- norms, biases, SSM conv filters and MoE routers: tiny, and sensitive (a router's choice flips).
A weight whose rows do not divide into the grid's blocks takes the plan's stated fallback, and the
plan lists it with the reason; nothing falls back silently.
"""

from __future__ import annotations

import fnmatch
from typing import Any

from shrink.errors import ShrinkError
from shrink.numformats.plan import QuantPlan, TensorGrid
from shrink.numformats.registry import FAMILIES, FORMATS, NumberFormat, fitting_format, stored_format, vocabulary_format

KEEP_DEFAULT = ("lm_head", "*.router", "*.gate", "*embed*")


def _wanted(name: str, runtime: str) -> NumberFormat:
    """A family as `runtime` stores it, or one of `runtime`'s own stored formats by name (q4_k). A
    family's name wins where a plain format shares it (fp8: per-row FP8 weights, not the per-tensor type)."""
    record = FORMATS.get(name.lower())
    if name.lower() not in FAMILIES and record is not None and record.runtime == runtime and record.grid:
        return record
    return stored_format(name, runtime)


def grid_for(family: str, runtime: str) -> str:
    """The grid a family's weights (or a stored format's, such as q4_k) are made on for `runtime` (an
    unknown family or runtime is an error)."""
    return _wanted(family, runtime).grid


def make_plan(model: Any, family: str, runtime: str = "gguf", keep: tuple[str, ...] = KEEP_DEFAULT,
              activations: str | None = None) -> QuantPlan:
    """One stored format per Linear weight of `model` (module names matched against `keep` stay unquantized)."""
    import torch


    wanted = _wanted(family, runtime)
    vocabulary = vocabulary_format(wanted, runtime) if runtime == "gguf" else None
    plan = QuantPlan(family=family, runtime=runtime, grid=wanted.grid, activations=activations,
                     vocabulary=vocabulary.grid if vocabulary else None, stored=wanted.name)
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in keep):
            plan.kept.append(name)
            continue
        columns = module.weight.shape[1]
        chosen = fitting_format(wanted, [columns])
        if chosen is None:
            raise ShrinkError(f"{name} has rows of {columns}, which no format after {wanted.name} divides into blocks.")
        reason = None if chosen is wanted else (
            f"rows of {columns} are not a multiple of {wanted.name}'s {wanted.block}-element blocks")
        plan.tensors.append(TensorGrid(name, chosen.grid, reason, chosen.name))
    if not plan.tensors:
        raise ShrinkError("No Linear weight is left to quantize once the kept patterns are applied.")
    return plan
