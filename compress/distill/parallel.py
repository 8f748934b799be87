"""Data parallelism for the distillation loop: the same command single-process or under torchrun.

Under `torchrun --nproc_per_node N` (gloo on CPU, NCCL on GPUs) every rank takes its share of each
step's sequences, so N ranks compute the step a single process computes. With DDP every rank holds
the whole student and DistributedDataParallel averages the gradients; with FSDP2 (`shard`) each holds
1/N of the weights, gradients and optimizer state. Rank 0 alone prints.
"""

from __future__ import annotations

import copy
import functools
import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

from shrink.errors import ShrinkError

PARALLEL = ("auto", "ddp", "fsdp")
PRECISIONS = ("fp32", "bf16")


def check_parallel(setting: str) -> None:
    if setting not in PARALLEL:
        raise ShrinkError(f"--parallel must be one of {', '.join(PARALLEL)}, not '{setting}'.")


def check_precision(setting: str) -> None:
    if setting not in PRECISIONS:
        raise ShrinkError(f"Precision must be one of {', '.join(PRECISIONS)}, not '{setting}'.")


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

    def from_main(self, value: Any) -> Any:
        """Rank 0's `value` on every rank: a decision only rank 0 can make (from its evaluation, say)."""
        if self.size <= 1:
            return value
        import torch.distributed as dist

        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def sum(self, tensor: Any) -> Any:
        """`tensor` summed over every process, in place (each process holding the sums of its share)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def shard(self, rows: list[int]) -> list[int]:
        """This rank's rows of a step's batch (every rank gets the same count when it divides)."""
        return rows[self.rank::self.size]

    def check_batch(self, batch_size: int) -> None:
        """Refuse, before any work, a training batch that does not split evenly over the processes (a
        process with no sequence in a step would have nothing to run its collectives with)."""
        if batch_size % self.size:
            raise ShrinkError(f"--batch-size {batch_size} does not split evenly over {self.size} processes.")


def world() -> World:
    """The process group torchrun set up (joined on first call), or a single process."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            # each process its own GPU (object collectives use the current device); gloo beside NCCL for
            # the collectives on CPU tensors (scores, losses summed in float64)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
            dist.init_process_group("cpu:gloo,cuda:nccl")
        else:
            dist.init_process_group("gloo")
    return World(rank=dist.get_rank(), size=dist.get_world_size())


@contextmanager
def main_rank_first(current: World) -> Iterator[None]:
    """Rank 0 runs the block first (say, writing a cache), then the others run it and find the cache."""
    if not current.is_main:
        current.barrier()
    yield
    if current.is_main:
        current.barrier()


TRAINING_STATE = 16  # bytes a trained parameter: float32 weights, gradient and AdamW's two moments
UNSHARDED = 12  # bytes a parameter of the FSDP2 unit running (sharded_state_bytes)


def choose_parallel(setting: str, params: int, current: World) -> str:
    """none (one process), ddp or fsdp for a student of `params` parameters; `auto` shards (FSDP2) when
    its training state in float32 (weights, gradients, two AdamW moments: 16 bytes a parameter) would take
    more than a quarter of one process's memory (the GPU's, or the host's divided among the processes on
    this node)."""
    if current.size <= 1:
        return "none"
    if setting != "auto":
        return setting
    import torch

    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(current.rank % torch.cuda.device_count()).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // int(os.environ.get("LOCAL_WORLD_SIZE", current.size))
    return "fsdp" if TRAINING_STATE * params > memory / 4 else "ddp"


def shard(root: Any, student: Any, current: World, precision: str = "fp32") -> None:
    """FSDP2 (torch.distributed.fsdp.fully_shard) over `current`'s processes: each decoder layer of
    `student` is one unit, so are an untied embedding and head (vocabulary_units), and `root` (the
    module whose forward the trainer calls) holds the rest (the final norm; a tied embedding and head). Parameters, gradients and optimizer state live 1/N per process; a layer's whole
    weights exist only while it runs. bf16: weights gathered in bf16, gradients reduced in float32."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    from shrink.compress.distill.chunked import SHARDED_HEAD_LOSS, head_loss

    kind = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(kind, (current.size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" \
        else MixedPrecisionPolicy()
    for unit in units(student):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    head = student.get_output_embeddings()
    if isinstance(head, FSDPModule):  # the sliced loss reads the head's weight: gather it for that call
        setattr(head, SHARDED_HEAD_LOSS, functools.partial(head_loss, head))
        register_fsdp_forward_method(head, SHARDED_HEAD_LOSS)
    fully_shard(root, mesh=mesh, mp_policy=policy)


def meta_skeleton(module: Any) -> Any:
    """A copy of `module` whose parameters and buffers are on the meta device: its structure without
    its memory (tied parameters stay tied). FSDP2 shards it, then fill_shards gives it values."""
    import torch

    memo: dict[int, Any] = {}
    for p in module.parameters():
        memo[id(p)] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty_like(b, device="meta")
    skeleton = copy.deepcopy(module, memo)
    # a structure-only module may have lost its ties (.to("meta") gives each module a new parameter): tied
    # again as transformers ties this model, its skeleton has rank 0's parameters, so the same shards (a
    # module with weights keeps its own ties through the copy)
    if any(p.is_meta for p in module.parameters()) and hasattr(skeleton, "tie_weights"):
        skeleton.tie_weights()
    return skeleton


def fill_shards(sharded: Any, full: Any, device: Any) -> None:
    """Each process's shards of `sharded` (a meta_skeleton FSDP2 has sharded), on `device`, from rank
    0's `full` weights (the other processes' `full` may be on the meta device: structure only, never
    read); buffers (non-persistent ones too, such as rotary frequencies) broadcast whole."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    sharded.to_empty(device=device)
    weights = full.state_dict() if dist.get_rank() == 0 else {}
    set_model_state_dict(sharded, weights, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    mine = dict(full.named_buffers())
    for name, buffer in sharded.named_buffers():
        if dist.get_rank() == 0:
            buffer.copy_(mine[name])
        dist.broadcast(buffer, src=0)


def shard_module(module: Any, current: World) -> None:
    """FSDP2 over `current`'s processes for one module trained alone (a Puzzle variant): its
    parameters, gradients and optimizer state 1/N per process, gathered while it runs, on the device
    the module is on (BLD trains where the parent's recorded streams are)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    kind = next(module.parameters()).device.type
    fully_shard(module, mesh=init_device_mesh(kind, (current.size,)))


def units(student: Any) -> list[Any]:
    """The modules FSDP2 shards as units of their own: each decoder layer and the vocabulary units."""
    body = getattr(student, student.base_model_prefix, student)
    return [*getattr(body, "layers", []), *vocabulary_units(student)]


def sharded_state_bytes(student: Any, processes: int) -> int:
    """Estimated training state of one process under FSDP2: TRAINING_STATE bytes a parameter / N, plus
    the largest unit held whole while it runs (UNSHARDED bytes a parameter: its gathered weights, its
    whole gradient and FSDP2's flat copy of that gradient for the reduce-scatter)."""
    params = sum(p.numel() for p in student.parameters())
    largest = max((sum(p.numel() for p in unit.parameters()) for unit in units(student)), default=0)
    return TRAINING_STATE * params // processes + (UNSHARDED * largest if processes > 1 else 0)


def vocabulary_units(student: Any) -> list[Any]:
    """The input embedding and an untied output projection, each a unit of its own, so that neither is
    held whole for the whole step by the root unit (in a small model they are most of the weights). A
    head tied to the embedding stays in the root: FSDP2 cannot share one parameter between two units."""
    from shrink.compress.distill.chunked import Head

    embedding, head = student.get_input_embeddings(), student.get_output_embeddings()
    if embedding is None or head is None or head.weight is embedding.weight:
        return []
    return [embedding] + ([head] if Head.splits(student) else [])


def wrap(model: Any, current: World) -> Any:
    if current.size <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model)
