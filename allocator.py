"""glibc's heap policy for shrink's processes: large allocations mapped on their own, so freed tensors
go back to the system.

glibc maps an allocation of 128 KiB and more on its own at first, but every such free raises that
threshold to the freed size (up to 32 MiB): after a model is loaded and freed, layer-sized tensors come
from the heap, whose freed chunks stay resident and are reused for the next ones. Measured under FSDP2
(benchmarks/fsdp_memory.py, 241.7M parameters, 2 processes): about 0.4 GB per process stayed resident
beyond the live tensors with a 1 MiB threshold set only when training started, about 0.2 GB with it set
from the start of the process, none with 128 KiB from the start. Mapping costs page faults: a forward and
backward pass of the embedded model on 4 x 128 tokens took 4.2-4.6 s with glibc's default, 5.0 s with
1 MiB and 5.3-5.4 s with 128 KiB (2 cores). So 128 KiB under torchrun, where memory per process is the
point (and on GPUs the host allocates little), 1 MiB in a single process. No-op without glibc.
"""

from __future__ import annotations

import ctypes
import functools
import os

M_MMAP_THRESHOLD = -3
ALONE = 1 << 20
SHARDED = 128 << 10  # glibc's own starting threshold, kept instead of letting it rise


@functools.cache
def _libc():
    try:
        libc = ctypes.CDLL(None)  # the C library this process already runs on
    except OSError:
        return None
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def threshold() -> int:
    """The threshold this process keeps: SHARDED under torchrun, ALONE otherwise."""
    return SHARDED if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ALONE


def map_large_allocations() -> None:
    """Fix the threshold from here on: call it before loading a model, at the start of the process."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold())


def return_freed_memory() -> None:
    """The threshold fixed, and the heap's free pages handed back now (before a training loop)."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, threshold())
        libc.malloc_trim(0)
