"""Data parallelism for the distillation loop: the same command single-process or under torchrun.

Under `torchrun --nproc_per_node N` (gloo on CPU, NCCL on GPUs) every rank holds the whole model,
takes its share of each step's sequences, and DistributedDataParallel averages the gradients, so N
ranks compute the step a single process computes. Rank 0 alone writes checkpoints and prints.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()

    def finish(self) -> None:
        """Every rank waits here, then leaves the process group: a rank that exits with gloo's
        threads still running aborts ("terminate called without an active exception")."""
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()

    def shard(self, rows: list[int]) -> list[int]:
        """This rank's rows of a step's batch (every rank gets the same count when it divides)."""
        return rows[self.rank::self.size]


def world() -> World:
    """The process group torchrun set up (joined on first call), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size())


@contextmanager
def main_rank_first(current: World) -> Iterator[None]:
    """Rank 0 runs the block first (say, writing a cache), then the others run it and find the cache."""
    if not current.is_main:
        current.barrier()
    yield
    if current.is_main:
        current.barrier()


def wrap(model: Any, current: World) -> Any:
    if current.size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)
