"""The chosen architecture as a real model: a copy of the parent whose layers hold the chosen variants
with their blockwise-distilled weights (narrower FFNs and pooled KV heads are smaller tensors; linear
and no-op sub-blocks are one map or nothing). Saved and reloaded by shrink through layershapes.py."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path
from typing import Any

from shrink.compress.puzzle.bld import load_variant
from shrink.compress.puzzle.library import Variant
from shrink.families import spec_from_model


def assemble(loaded: Any, choice: dict[int, dict[str, Variant]], bld_dir: Path, importance: Any) -> Any:
    modules = {(i, v.sub): load_variant(loaded, i, v, bld_dir, importance)
               for i, subs in choice.items() for v in subs.values() if v.name != "parent"}
    model = copy.deepcopy(loaded.model)
    for (i, sub), module in modules.items():
        setattr(model.model.layers[i], "self_attn" if sub == "attention" else "mlp", module)
    for p in model.parameters():
        p.requires_grad_(True)
    spec = replace(spec_from_model(model), formats=loaded.spec.formats, name=f"{loaded.spec.name}-puzzle")
    return replace(loaded, model=model.eval(), spec=spec)
