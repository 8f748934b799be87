"""The chosen architecture as a real model: a copy of the parent whose layers hold the chosen variants
with their blockwise-distilled weights (narrower FFNs and pooled KV heads are smaller tensors; linear
and no-op sub-blocks are one map or nothing), saved and reloaded by shrink through layershapes.py; or,
when Mamba2 mixers were chosen, the parent rebuilt as transformers' GraniteMoeHybrid with those layers
holding the trained mixers (a model every tool reads as it is, llama.cpp's granitehybrid included)."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

from shrink.compress.puzzle.bld import load_variant
from shrink.compress.puzzle.granite import ATTENTION, MAMBA, granite_from_llama
from shrink.compress.puzzle.library import Variant
from shrink.errors import ShrinkError
from shrink.families import spec_from_model


def assemble(loaded: Any, choice: dict[int, dict[str, Variant]], bld_dir: Path, importance: Any) -> Any:
    modules = {(i, v.sub): load_variant(loaded, i, v, bld_dir, importance)
               for i, subs in choice.items() for v in subs.values() if v.name != "parent"}
    if any(v.name == "mamba2" for subs in choice.values() for v in subs.values()):
        return _hybrid(loaded, modules)
    model = copy.deepcopy(loaded.model)
    for (i, sub), module in modules.items():
        setattr(model.model.layers[i], "self_attn" if sub == "attention" else "mlp", module)
    for p in model.parameters():
        p.requires_grad_(True)
    spec = replace(spec_from_model(model), formats=loaded.spec.formats, name=f"{loaded.spec.name}-puzzle")
    return replace(loaded, model=model.eval(), spec=spec)


def _hybrid(loaded: Any, modules: dict[tuple[int, str], Any]) -> Any:
    """The parent as a GraniteMoeHybrid whose chosen layers hold their trained Mamba2 mixers (the solver
    left every other sub-block the parent's: library.holds_together)."""
    others = sorted(i for (i, _), module in modules.items() if getattr(module, "variant", None) != "mamba2")
    if others:
        raise ShrinkError(f"A child with Mamba2 mixers is a GraniteMoeHybrid, which cannot hold the other variants "
                          f"chosen for layers {others}; choose parents there.")
    layers = len(loaded.model.model.layers)
    types = [MAMBA if (i, "attention") in modules else ATTENTION for i in range(layers)]
    model = granite_from_llama(loaded.model, types)
    for (i, _), module in modules.items():
        model.model.layers[i].mamba.load_state_dict(module.mamba.state_dict())
    for p in model.parameters():
        p.requires_grad_(True)
    spec = replace(spec_from_model(model), formats=loaded.spec.formats, name=f"{loaded.spec.name}-puzzle")
    return replace(loaded, model=model.eval(), spec=spec)
