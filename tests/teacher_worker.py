"""The teacher's top-k pass in its own process, for the test that runs it under torchrun.

python tests/teacher_worker.py OUT: computes the tiny teacher's top-k over DATA (each process a share
under torchrun); rank 0 writes the result to OUT, every rank the number of batches it ran to OUT.rankN.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from shrink.compress.distill.parallel import world
from shrink.compress.distill.teacher import teacher_topk
from tiny_models import tiny_configs

DATA = torch.randint(0, 101, (18, 24), generator=torch.Generator().manual_seed(7))  # 5 batches of 4: uneven shares


def teacher():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_configs()["qwen2"]).eval()


if __name__ == "__main__":
    current = world()
    model, batches = teacher(), []
    model.register_forward_hook(lambda module, args, output: batches.append(args[0].shape[0]))
    values, indices = teacher_topk(model, DATA, k=16, current=current)
    Path(f"{sys.argv[1]}.rank{current.rank}").write_text(str(len(batches)))
    if current.is_main:
        torch.save({"values": values, "indices": indices}, sys.argv[1])
    current.finish()
