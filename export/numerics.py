"""Numeric faults named before an artifact is written: NaN or infinite weights, and weights a half-precision
file cannot hold (float16's largest finite value is 65504; beyond it a value would be written as inf)."""

from __future__ import annotations

from typing import Any

import numpy as np

from shrink.errors import ShrinkError

F16_MAX = 65504.0


def check_weights(state: dict[str, Any], half: tuple[str, ...] = ()) -> None:
    """Refuse non-finite weights anywhere, and values beyond float16's range in the tensors named in `half`."""
    for name, array in state.items():
        values = np.asarray(array)
        bad = int(values.size - np.isfinite(values).sum())
        if bad:
            raise ShrinkError(f"{name} holds {bad:,} NaN or infinite value(s); the model is damaged (a diverged "
                              "training or a corrupt file), so no artifact is written.")
        if name in half and values.size and float(np.abs(values).max()) > F16_MAX:
            raise ShrinkError(f"{name} holds values up to {float(np.abs(values).max()):.4g}, beyond float16's "
                              f"{F16_MAX:g}; export it as bf16 or f32, or quantize it.")
