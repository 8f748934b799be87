"""The scoring passes split across processes, for the test that runs them under torchrun.

python tests/scores_worker.py OUT: Minitron importance, the per-layer KL depth scores and Puzzle's
replace-one-block scores of a tiny Gemma 3 (each process a share under torchrun); rank 0 writes the
results to OUT, every rank the passes it ran to OUT.rankN.
"""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from shrink.compress.distill.parallel import World, world
from shrink.compress.importance import cached_score, layer_kl_scores
from shrink.compress.puzzle import scores
from shrink.compress.puzzle.library import Variant, build
from shrink.families import spec_from_model
from shrink.model import LoadedModel
from tiny_models import build as build_model
from tiny_models import peaked

DATA = torch.randint(0, 101, (10, 16), generator=torch.Generator().manual_seed(3))  # 3 batches of 4: uneven shares
VARIANTS = [Variant("attention", n) for n in ("parent", "linear", "none")] + \
    [Variant("ffn", n) for n in ("parent", "ffn50", "linear", "none")]


def passes(current: World) -> tuple[dict, dict]:
    """The three scorings' results, and how many model passes / replacements this process ran."""
    model = peaked(build_model("gemma3"))
    loaded = LoadedModel(model, None, spec_from_model(model), "tiny-gemma3")
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    importance = cached_score(loaded, DATA, 4, current=current)
    ran = {"importance": len(calls)}
    calls.clear()
    depth = layer_kl_scores(loaded, DATA, 4, current=current)
    ran["layer_kl"] = len(calls)
    handle.remove()
    candidates = {(i, v): build(model.model.layers[i], loaded.spec.layers[i], v, i, importance.ffn[i])
                  for i in (0, 3) for v in VARIANTS}
    counted, kl = [], scores.kl
    scores.kl = lambda *args: counted.append(1) or kl(*args)
    try:
        replaced = scores.replace_one_block(loaded, DATA[:4], candidates, batch_size=2, current=current)
    finally:
        scores.kl = kl
    ran["replacements"] = len(counted)
    result = {"ffn": importance.ffn, "heads": importance.heads, "hidden": importance.hidden,
              "layers": importance.layers, "tokens": importance.tokens, "layer_kl": depth,
              "replace_one_block": {f"{i}|{v.key}": value for (i, v), value in replaced.items()}}
    return result, ran


if __name__ == "__main__":
    torch.set_num_threads(1)
    current = world()
    result, ran = passes(current)
    Path(f"{sys.argv[1]}.rank{current.rank}").write_text(json.dumps(ran))
    if current.is_main:
        torch.save(result, sys.argv[1])
    current.finish()
