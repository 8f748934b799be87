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
from dataclasses import asdict, dataclass, field
from typing import Any

from shrink.errors import ShrinkError

# format family -> runtime -> grid (a name in compress/quant/formats.py)
GRIDS: dict[str, dict[str, str]] = {
    "nvfp4": {"gguf": "nvfp4_gguf", "torch": "nvfp4"},
    "mxfp4": {"gguf": "mxfp4", "torch": "mxfp4"},
    "fp8": {"torch": "fp8_e4m3_channel"},
    "int8": {"gguf": "q8_0", "onnx": "int8_g32", "torch": "int8"},
    "int4": {"gguf": "q4_0", "onnx": "int4_g32", "torch": "int4_g128"},
    "ternary": {"gguf": "ternary_b256", "torch": "ternary"},
    "binary": {"gguf": "binary_b128", "torch": "binary"},
}
# the next grid to try when rows do not divide into the wanted grid's blocks (GGUF: Gemma 3's
# 640-wide rows do not divide into TQ's 256-element blocks)
FALLBACK: dict[str, str] = {"ternary_b256": "q4_0", "binary_b128": "q4_0", "nvfp4_gguf": "q8_0", "mxfp4": "q8_0",
                            "q4_0": "q8_0", "q8_0": "f16", "int4_g128": "int8", "int4_g32": "int8"}
KEEP_DEFAULT = ("lm_head", "*.router", "*.gate", "*embed*")
# GGUF stores the vocabulary tensors too: on Q8_0 (as llama.cpp's own low-bit mixes keep them at 6-8
# bits), and the student holds them on that grid so that it equals the export
VOCABULARY_GRID = {"gguf": "q8_0"}
SAVED_KEY = "shrink_quant"


@dataclass
class TensorGrid:
    module: str  # the Linear module's name, e.g. model.layers.0.self_attn.q_proj
    grid: str
    fallback_reason: str | None = None


@dataclass
class QuantPlan:
    family: str
    runtime: str
    grid: str  # the wanted grid; some tensors may take a fallback (see tensors)
    activations: str | None = None
    vocabulary: str | None = None  # grid of the token embedding and lm_head (frozen during QAD), None: kept
    tensors: list[TensorGrid] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # Linear modules left in high precision

    def grid_of(self, module: str) -> str | None:
        return next((t.grid for t in self.tensors if t.module == module), None)

    @property
    def fallbacks(self) -> list[TensorGrid]:
        return [t for t in self.tensors if t.fallback_reason]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantPlan":
        return cls(**{**data, "tensors": [TensorGrid(**t) for t in data.get("tensors", [])]})


def grid_for(family: str, runtime: str) -> str:
    if family not in GRIDS:
        raise ShrinkError(f"Unknown format '{family}'; choose one of: {', '.join(GRIDS)}.")
    grids = GRIDS[family]
    if runtime not in grids:
        raise ShrinkError(f"{family} has no {runtime} export that a runtime here executes; "
                          f"{family} exports to: {', '.join(r for r in grids if r != 'torch') or 'none (PyTorch only)'}.")
    return grids[runtime]


def make_plan(model: Any, family: str, runtime: str = "gguf", keep: tuple[str, ...] = KEEP_DEFAULT,
              activations: str | None = None) -> QuantPlan:
    """One grid per Linear weight of `model` (module names matched against `keep` stay unquantized)."""
    import torch

    from shrink.compress.quant.formats import block_size

    wanted = grid_for(family, runtime)
    plan = QuantPlan(family=family, runtime=runtime, grid=wanted, activations=activations,
                     vocabulary=VOCABULARY_GRID.get(runtime))
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in keep):
            plan.kept.append(name)
            continue
        grid, reason = wanted, None
        columns = module.weight.shape[1]
        while columns % block_size(grid):
            nxt = FALLBACK.get(grid)
            if nxt is None:
                raise ShrinkError(f"{name} has rows of {columns}, which no grid after {wanted} divides into blocks.")
            reason = reason or f"rows of {columns} are not a multiple of {wanted}'s {block_size(wanted)}-element blocks"
            grid = nxt
        plan.tensors.append(TensorGrid(name, grid, reason))
    if not plan.tensors:
        raise ShrinkError("No Linear weight is left to quantize once the kept patterns are applied.")
    return plan
