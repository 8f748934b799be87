"""Replace-one-block scores (Puzzle §4.2): the parent with only one sub-block swapped for a variant,
scored by KL(parent || child) of the next-token distributions on held-out text.

The parent's inputs to every layer are recorded once per batch, so each score reruns only the
layers from the swapped one on; the parent's distributions are computed once per batch, and the
vocabulary projection runs over slices of positions.
"""

from __future__ import annotations

from typing import Any, Callable

from shrink.compress.distill.parallel import World
from shrink.compress.puzzle.bld import layer_inputs, swapped
from shrink.compress.puzzle.library import Variant
from shrink.progress import ProgressLines

POSITIONS_PER_SLICE = 128


def _suffix(model: Any, inputs: list[tuple[Any, dict]], start: int, x: Any) -> Any:
    """The decoder's final hidden state (after its norm) when layer `start` receives x."""
    for layer, (_, kwargs) in zip(model.model.layers[start:], inputs[start:]):
        out = layer(x, **kwargs)
        x = out[0] if isinstance(out, tuple) else out
    return model.model.norm(x)


def _log_probs(model: Any, hidden: Any) -> Any:
    import torch

    logits = model.lm_head(hidden).float()
    cap = getattr(model.config.get_text_config(), "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return torch.log_softmax(logits, dim=-1)


def parent_log_probs(model: Any, parent_hidden: Any) -> list[Any]:
    """The parent's next-token log-probabilities in slices of positions, computed once per batch."""
    parent = parent_hidden.flatten(0, -2)
    return [_log_probs(model, parent[start:start + POSITIONS_PER_SLICE])
            for start in range(0, parent.shape[0], POSITIONS_PER_SLICE)]


def kl(model: Any, parent: list[Any], child_hidden: Any) -> float:
    """Sum over positions of KL(parent || child), `parent` as parent_log_probs gives it."""
    child = child_hidden.flatten(0, -2)
    total = 0.0
    for n, p in enumerate(parent):
        q = _log_probs(model, child[n * POSITIONS_PER_SLICE:(n + 1) * POSITIONS_PER_SLICE])
        total += float((p.exp() * (p - q)).sum())
    return total


def replace_one_block(loaded: Any, sequences: Any, candidates: dict[tuple[int, Variant], Any],
                      batch_size: int = 4, status: Callable[[str], None] = lambda message: None,
                      current: World = World()) -> dict[tuple[int, Variant], float]:
    """KL per position of the parent with layer i's sub-block replaced by each candidate module
    ({(i, variant): module}); the parent variant scores 0 without being run. Under torchrun each
    process scores every size-th replacement and the sums are added over the processes."""
    import torch

    model = loaded.model.eval()
    runs = [key for key in candidates if key[1].name != "parent"]
    mine = set(range(current.rank, len(runs), current.size))  # indices into runs
    totals = torch.zeros(len(runs), dtype=torch.float64)
    positions = 0
    batches = range(0, sequences.shape[0], batch_size)
    status(f"Scoring {len(runs)} block replacements on {sequences.numel():,} held-out tokens"
           + (f" ({len(mine)} in this process)" if current.size > 1 else ""))
    with ProgressLines("replace-one-block scores", len(batches) * len(mine), "replacement") as progress, torch.no_grad():
        for start in batches:
            inputs, parent_hidden = layer_inputs(model, sequences[start:start + batch_size])  # after the final norm
            parent = parent_log_probs(model, parent_hidden)
            for n, key in enumerate(runs):
                if n not in mine:
                    continue
                i, variant = key
                layer = model.model.layers[i]
                with swapped(layer, **{variant.sub: candidates[key]}):
                    child_hidden = _suffix(model, inputs, i, inputs[i][0])
                totals[n] += kl(model, parent, child_hidden)
                progress.advance()
            positions += int(parent_hidden.shape[0] * parent_hidden.shape[1])
    current.sum(totals)
    scored = {key: float(totals[n]) / positions for n, key in enumerate(runs)}
    return {key: scored.get(key, 0.0) for key in candidates}
