"""The teacher cached as its top-k (log-probabilities, indices) per position: it runs once per data set.

The values are log-probabilities over the whole vocabulary, not raw logits, so that the mass the
teacher puts outside its top k is known (1 - sum of exp(values)) and the top-k KL can count it
(compress/distill/losses.py: topk_forward_kl). Keyed by the teacher's weights, the token sequences,
k and the layout version, stored as safetensors in the shrink cache (written atomically). A
262,144-token vocabulary is never held for a whole batch: each batch's logits are reduced to k
columns right after the teacher's forward pass.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

from shrink.errors import ShrinkError
from shrink.model import weights_hash
from shrink.progress import ProgressLines
from shrink.storage import atomic_path, cache_dir

log = logging.getLogger("shrink")


LAYOUT = "log-probabilities float32 v2"  # v1 held float16 raw logits: a cache of that kind is not reused


def teacher_topk(teacher: Any, sequences: Any, k: int = 64, batch_size: int = 4) -> tuple[Any, Any]:
    """(log-probabilities float32 [n, L, k], indices int32 [n, L, k]) of the teacher's k most likely
    tokens per position, cached on disk."""
    import torch
    from safetensors.torch import load_file, save_file


    digest = hashlib.sha256()
    digest.update(weights_hash(teacher).encode())
    digest.update(sequences.contiguous().numpy().tobytes())
    digest.update(str(k).encode())
    digest.update(LAYOUT.encode())
    path = cache_dir("teacher") / f"topk-{digest.hexdigest()[:24]}.safetensors"
    if path.is_file():
        cached = load_file(str(path))
        return cached["values"], cached["indices"]
    values, indices = [], []
    teacher.eval()
    with torch.no_grad(), ProgressLines("teacher top-k logits", -(-sequences.shape[0] // batch_size), "batch") as lines:
        for start in range(0, sequences.shape[0], batch_size):
            log_probs = torch.log_softmax(teacher(sequences[start:start + batch_size]).logits.float(), -1)
            top = torch.topk(log_probs, k=min(k, log_probs.shape[-1]), dim=-1)
            if not bool(torch.isfinite(top.values).all()):
                raise ShrinkError(f"The teacher's logits are NaN or infinite on sequences {start}-"
                                  f"{min(start + batch_size, sequences.shape[0]) - 1}, so there is nothing to distill "
                                  "from: it overflows in float32 on this text or its weights are damaged.")
            values.append(top.values)
            indices.append(top.indices.int())
            lines.advance()
    result = {"values": torch.cat(values).contiguous(), "indices": torch.cat(indices).contiguous()}
    with atomic_path(path) as tmp:
        save_file(result, str(tmp))
    log.info("Teacher top-%d log-probabilities cached in %s", k, path)
    return result["values"], result["indices"]
