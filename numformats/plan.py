"""A quantization plan as a model carries it: which stored format (and so which grid) each Linear
weight takes. `compress.quant.plan.make_plan` writes one; a quantized student stores it in its config
(`shrink_quant`) so that export packs each weight in exactly the format it was trained on."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from shrink.numformats.registry import FORMATS

SAVED_KEY = "shrink_quant"


@dataclass
class TensorGrid:
    module: str  # the Linear module's name, e.g. model.layers.0.self_attn.q_proj
    grid: str  # exact numerics (shrink.numformats.grids)
    fallback_reason: str | None = None
    stored: str = ""  # the registry format it is written as; "" in plans saved before the registry

    def __post_init__(self) -> None:
        self.stored = self.stored or _stored_of_grid(self.grid)


@dataclass
class QuantPlan:
    family: str
    runtime: str
    grid: str  # the wanted grid; some tensors may take a fallback (see tensors)
    activations: str | None = None
    vocabulary: str | None = None  # stored format of the token embedding and lm_head (frozen in QAD); None: kept
    tensors: list[TensorGrid] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # Linear modules left in high precision
    stored: str = ""  # the wanted stored format (registry name)

    def __post_init__(self) -> None:
        self.stored = self.stored or _stored_of_grid(self.grid, self.runtime)

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


def _stored_of_grid(grid: str, runtime: str | None = None) -> str:
    """The registry format made on `grid` (preferring `runtime`'s), for plans saved before `stored`."""
    made = [f for f in FORMATS.values() if f.grid == grid]
    preferred = [f for f in made if f.runtime == runtime] or made
    return preferred[0].name if preferred else grid


def saved_plan(model_or_config: Any) -> QuantPlan | None:
    config = getattr(model_or_config, "config", model_or_config)
    config = getattr(config, "text_config", None) or config
    data = getattr(config, SAVED_KEY, None)
    return QuantPlan.from_dict(data) if data else None
