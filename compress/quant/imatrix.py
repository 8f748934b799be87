"""The importance matrix llama.cpp's quantizer weighs its rounding by, computed by shrink.

For every linear layer: the mean over calibration tokens of the squared input activation, one value
per input column (what `llama-imatrix` accumulates: sum of x_j^2 over tokens divided by the token
count). A column that carries large activations costs more output error per unit of weight error,
so the quantizer's scale search weights it more. Keys are the model's parameter names (the export
layer maps them to GGUF tensor names); cached on disk by the weights and the calibration tokens.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

from shrink.model import weights_hash
from shrink.storage import atomic_path, cache_dir

CACHE_VERSION = b"imatrix-v1"


class _OutputReached(Exception):
    """Raised once the output projection's input is recorded: its logits are not needed."""


def importance_matrix(model: Any, batches: Any, batch_size: int = 4) -> dict[str, np.ndarray]:
    """Parameter name of each nn.Linear weight -> float32 [in_features] mean squared input."""
    import torch

    output = model.get_output_embeddings()

    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    handles = []

    def hook(name: str) -> Any:
        def accumulate(_module: Any, args: tuple) -> None:
            x = args[0].detach().double().reshape(-1, args[0].shape[-1])
            sums[name] = sums.get(name, 0) + (x * x).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
            if _module is output:  # the vocabulary-sized logits would cost more than every block together
                raise _OutputReached
        return accumulate

    model = model.eval()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            handles.append(module.register_forward_pre_hook(hook(f"{name}.weight")))
    try:
        with torch.no_grad():
            for start in range(0, batches.shape[0], batch_size):
                try:
                    model(batches[start:start + batch_size])
                except _OutputReached:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return {name: (sums[name] / counts[name]).float().numpy() for name in sums}


def cached_importance_matrix(model: Any, batches: Any, batch_size: int = 4) -> dict[str, np.ndarray]:
    """`importance_matrix`, cached by the model's weights and the calibration tokens."""
    digest = hashlib.sha256(CACHE_VERSION + weights_hash(model).encode()
                            + batches.contiguous().numpy().tobytes()).hexdigest()[:24]
    path = cache_dir("imatrix") / f"{digest}.npz"
    if path.is_file():
        with np.load(path) as data:
            return {name: data[name] for name in data.files}
    matrix = importance_matrix(model, batches, batch_size)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:  # np.savez appends .npz to a bare path name
            np.savez(handle, **matrix)
    return matrix
