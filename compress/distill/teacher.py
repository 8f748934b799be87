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
from collections.abc import Iterator
from typing import Any

from shrink.compress.distill.parallel import World
from shrink.errors import ShrinkError
from shrink.model import weights_hash
from shrink.progress import ProgressLines
from shrink.storage import atomic_path, cache_dir

log = logging.getLogger("shrink")


LAYOUT = "log-probabilities float32 v2"  # v1 held float16 raw logits: a cache of that kind is not reused


def teacher_topk(teacher: Any, sequences: Any, k: int = 64, batch_size: int = 4, current: World | None = None) -> tuple[Any, Any]:
    """(log-probabilities float32 [n, L, k], indices int32 [n, L, k]) of the teacher's k most likely
    tokens per position, cached on disk. Under torchrun (`current` with several processes) each process
    runs every size-th batch and the shares are gathered, so the pass takes 1/size of the time; rank 0
    writes the cache, the others wait for it."""
    import torch
    from safetensors.torch import load_file, save_file

    current = current or World()
    digest = hashlib.sha256()
    digest.update(weights_hash(teacher).encode())
    digest.update(sequences.contiguous().numpy().tobytes())
    digest.update(str(k).encode())
    digest.update(LAYOUT.encode())
    path = cache_dir("teacher") / f"topk-{digest.hexdigest()[:24]}.safetensors"
    if current.from_main(path.is_file()):  # every process takes the same path (the pass is a collective)
        cached = load_file(str(path))
        return cached["values"], cached["indices"]
    starts = list(range(0, sequences.shape[0], batch_size))
    mine = {start: _topk_batch(teacher, sequences, start, batch_size, k) for start in _share(starts, current)}
    if current.size > 1:  # every process gets every share, in batch order
        import torch.distributed as dist

        shares: list[Any] = [None] * current.size
        dist.all_gather_object(shares, mine)
        mine = {start: batch for share in shares for start, batch in share.items()}
    result = {"values": torch.cat([mine[s][0] for s in starts]).contiguous(),
              "indices": torch.cat([mine[s][1] for s in starts]).contiguous()}
    if current.is_main:
        with atomic_path(path) as tmp:
            save_file(result, str(tmp))
        log.info("Teacher top-%d log-probabilities cached in %s", k, path)
    current.barrier()  # nobody goes on to read a cache rank 0 is still writing
    return result["values"], result["indices"]


def _share(starts: list[int], current: World) -> Iterator[int]:
    """This process's batches, counted on its progress line."""
    with ProgressLines("teacher top-k logits", len(starts[current.rank::current.size]), "batch") as lines:
        for start in starts[current.rank::current.size]:
            yield start
            lines.advance()


def _topk_batch(teacher: Any, sequences: Any, start: int, batch_size: int, k: int) -> tuple[Any, Any]:
    import torch

    teacher.eval()
    with torch.no_grad():
        log_probs = torch.log_softmax(teacher(sequences[start:start + batch_size]).logits.float(), -1)
    top = torch.topk(log_probs, k=min(k, log_probs.shape[-1]), dim=-1)
    if not bool(torch.isfinite(top.values).all()):
        raise ShrinkError(f"The teacher's logits are NaN or infinite on sequences {start}-"
                          f"{min(start + batch_size, sequences.shape[0]) - 1}, so there is nothing to distill "
                          "from: it overflows in float32 on this text or its weights are damaged.")
    return top.values, top.indices.int()
