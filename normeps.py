"""Norm epsilons that a Hugging Face config cannot express, kept beside it so models reload exactly.

Pruning rescales some norms' epsilon so that the pruned model computes what the full model computed
with the dropped channels at zero (compress/prune.py). A config has one epsilon for every norm, so a
norm whose epsilon now differs from it (Nemotron-H's gated SSM norm after SSM or hidden pruning) is
listed under `shrink_norm_eps` by module name and set again by `shrink.model.load`.
"""

from __future__ import annotations

from typing import Any

from shrink import blocks

KEY = "shrink_norm_eps"


def _config(model: Any) -> Any:
    return getattr(model.config, "text_config", None) or model.config


def _config_epsilon(config: Any) -> float | None:
    for name in ("rms_norm_eps", "layer_norm_epsilon"):
        if getattr(config, name, None) is not None:
            return float(getattr(config, name))
    return None


def record(model: Any) -> None:
    """List the norms whose epsilon differs from the config's (removes the key when none does)."""
    config = _config(model)
    default = _config_epsilon(config)
    overrides = {name: eps for name, module in model.named_modules()
                 if blocks.is_norm(module) and (eps := blocks.epsilon(module)) is not None
                 and default is not None and abs(eps - default) > 1e-12 * max(abs(default), 1e-30)}
    if overrides:
        setattr(config, KEY, overrides)
    elif hasattr(config, KEY):
        delattr(config, KEY)


def apply(model: Any) -> None:
    for name, eps in (getattr(_config(model), KEY, None) or {}).items():
        blocks.set_epsilon(model.get_submodule(name), float(eps))
