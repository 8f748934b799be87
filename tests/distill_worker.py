"""A distillation run in its own process, for the tests that kill a run or start it under torchrun.

python tests/distill_worker.py OUT [STEPS]: distills the tiny pruned student of test_distill.py
for STEPS steps (a checkpoint after every step) and writes the final weights to OUT/final.pt.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.distill.trainer import DistillConfig, distill
from shrink.compress.importance import score
from shrink.compress.prune import prune_ffn
from shrink.families import spec_from_model
from shrink.model import LoadedModel
from tiny_models import tiny_configs

DATA = torch.randint(0, 101, (16, 24), generator=torch.Generator().manual_seed(5))


def setup():
    """The tiny teacher, its FFN-pruned student, and the cached top-k of the training rows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    teacher_model = AutoModelForCausalLM.from_config(tiny_configs()["qwen2"]).eval()
    teacher = LoadedModel(teacher_model, None, spec_from_model(teacher_model), "tiny-teacher")
    student = prune_ffn(teacher, score(teacher, DATA[:4]), 16)
    train = DATA[:12]
    return teacher, student, train, teacher_topk(teacher_model, train, k=16)


def config(steps: int) -> DistillConfig:
    return DistillConfig(loss="forward_kl", lr=3e-3, steps=steps, batch_size=4, checkpoint_every=1)


if __name__ == "__main__":
    out, steps = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6
    _, student, train, topk = setup()
    torch.set_num_threads(1)
    distill(student.model, train, topk, config(steps), out)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        torch.save(student.model.state_dict(), out / "final.pt")
