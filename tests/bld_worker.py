"""Puzzle's blockwise distillation in its own process, for the test that runs it under torchrun.

python tests/bld_worker.py OUT FAMILY PARALLEL [SEQUENCES]: trains a few variants of a tiny model's layers 0
and 1 into OUT (every process every variant, sharded, with PARALLEL fsdp; a disjoint share each with ddp) on
the first SEQUENCES (default 4) sequences of DATA.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from shrink.compress.distill.parallel import World, world
from shrink.compress.importance import score
from shrink.compress.puzzle import bld
from shrink.compress.puzzle.library import Variant
from shrink.families import spec_from_model
from shrink.model import LoadedModel
from tiny_models import build, peaked

DATA = torch.randint(0, 101, (4, 12), generator=torch.Generator().manual_seed(4))  # one batch: every step the same
VARIANTS = [Variant("attention", n) for n in ("parent", "kv1", "linear")] + \
    [Variant("ffn", n) for n in ("parent", "ffn50", "linear", "none")]


def train(out: Path, family: str, parallel: str, current: World, sequences: int = 4) -> dict:
    model = peaked(build(family))
    loaded = LoadedModel(model, None, spec_from_model(model), f"tiny-{family}")
    importance = score(loaded, DATA, 4)
    lib = [VARIANTS if i < 2 else [Variant("attention", "parent"), Variant("ffn", "parent")]
           for i in range(len(loaded.spec.layers))]
    return bld.run(loaded, DATA[:sequences], lib, importance, out, bld.BLDConfig(steps=6, lr=3e-3, parallel=parallel),
                   current=current)


if __name__ == "__main__":
    torch.set_num_threads(1)
    current = world()
    train(Path(sys.argv[1]), sys.argv[2], sys.argv[3], current, int(sys.argv[4]) if len(sys.argv) > 4 else 4)
    current.finish()
