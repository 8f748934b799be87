"""Teacher logits cached as top-k (values, indices) per position: the teacher runs once per data set.

Keyed by the teacher's weights, the token sequences and k, stored as safetensors in the shrink
cache (written atomically). A 262,144-token vocabulary is never held for a whole batch: each batch's
logits are reduced to k columns right after the teacher's forward pass.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from shrink.storage import atomic_path, cache_dir

log = logging.getLogger("shrink")


def teacher_topk(teacher: Any, sequences: Any, k: int = 64, batch_size: int = 4) -> tuple[Any, Any]:
    """(values float16 [n, L, k], indices int32 [n, L, k]) of the teacher's logits, cached on disk."""
    import torch
    from safetensors.torch import load_file, save_file

    from shrink.model import weights_hash

    digest = hashlib.sha256()
    digest.update(weights_hash(teacher).encode())
    digest.update(sequences.contiguous().numpy().tobytes())
    digest.update(str(k).encode())
    path = cache_dir("teacher") / f"topk-{digest.hexdigest()[:24]}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        return cached["values"], cached["indices"]
    values, indices = [], []
    teacher.eval()
    with torch.no_grad():
        for start in range(0, sequences.shape[0], batch_size):
            logits = teacher(sequences[start:start + batch_size]).logits.float()
            top = torch.topk(logits, k=min(k, logits.shape[-1]), dim=-1)
            values.append(top.values.half())
            indices.append(top.indices.int())
    result = {"values": torch.cat(values).contiguous(), "indices": torch.cat(indices).contiguous()}
    with atomic_path(path) as tmp:
        save_file(result, str(tmp))
    log.info("Teacher top-%d logits cached in %s", k, path)
    return result["values"], result["indices"]
