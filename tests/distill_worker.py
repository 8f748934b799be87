"""A distillation run in its own process, for the tests that kill a run or start it under torchrun.

python tests/distill_worker.py OUT [STEPS]: distills the tiny pruned student of test_distill.py
for STEPS steps (a checkpoint after every step) and writes the final weights to OUT/final.pt.
SHRINK_TEST_STRUCTURE_ONLY=1: every process but rank 0 holds the student on the meta device only.
"""

import os
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
    """The tiny teacher (qwen2, tied head, or the family in SHRINK_TEST_FAMILY), its FFN-pruned student, and
    the cached top-k of the training rows."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    family = os.environ.get("SHRINK_TEST_FAMILY", "qwen2")
    teacher_model = AutoModelForCausalLM.from_config(tiny_configs()[family]).eval()
    teacher = LoadedModel(teacher_model, None, spec_from_model(teacher_model), "tiny-teacher")
    student = prune_ffn(teacher, score(teacher, DATA[:4]), 16)
    train = DATA[:12]
    return teacher, student, train, teacher_topk(teacher_model, train, k=16)


def config(steps: int, parallel: str = "auto") -> DistillConfig:
    return DistillConfig(loss="forward_kl", lr=3e-3, steps=steps, batch_size=4, checkpoint_every=1, parallel=parallel)


if __name__ == "__main__":
    # OUT [STEPS [PARALLEL [STOP_AFTER]]]: PARALLEL ddp|fsdp|auto; STOP_AFTER ends the run early (its checkpoint kept)
    out, steps = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 6
    parallel = sys.argv[3] if len(sys.argv) > 3 else "auto"
    stop_after = int(sys.argv[4]) if len(sys.argv) > 4 else None
    _, student, train, topk = setup()
    torch.set_num_threads(1)
    from shrink.compress.distill.parallel import world

    current = world()
    structure_only = os.environ.get("SHRINK_TEST_STRUCTURE_ONLY") == "1" and not current.is_main
    if structure_only:  # as model.load(weights=False) leaves it: shapes on the meta device, no value
        student.model.to("meta")
    report = distill(student.model, train, topk, config(steps, parallel), out, stop_after=stop_after, current=current)
    if structure_only:
        assert all(p.is_meta for p in student.model.parameters()), "a structure-only student received weights"
    if current.is_main:
        torch.save(student.model.state_dict(), out / "final.pt")
        (out / "report.json").write_text(__import__("json").dumps(__import__("dataclasses").asdict(report)))
    current.finish()
