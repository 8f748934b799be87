"""The Puzzle step: library -> blockwise distillation -> replace-one-block scores -> costs on the target
-> mixed-integer choice -> assembled model -> global distillation. What `shrink puzzle` and a recipe's
`puzzle` step run; every stage's result is kept under `work` so a killed run resumes after the last
finished stage (trained variants one by one, the scores as one file).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shrink.compress.distill.parallel import check_parallel, world
from shrink.compress.importance import cached_score
from shrink.compress.puzzle import bld, scores, solve
from shrink.compress.puzzle.assemble import assemble
from shrink.compress.puzzle.library import FFN_SHARES, Variant, library
from shrink.errors import ShrinkError
from shrink.flows import defaults
from shrink.flows.steps import Hooks, distill, distill_config
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.storage import atomic_write_text

SCORE_SEQUENCES = 4  # held-out sequences the replace-one-block KL is measured on (each score reruns a suffix)


@dataclass(frozen=True)
class PuzzleSettings:
    target: str
    budget_s: float | None = None  # time per output token, estimated on the target
    ttft_s: float | None = None
    memory_bytes: float | None = None
    weights: str | None = None  # the format the blocks will be stored in (costs); None: the model's own
    ffn_shares: tuple[float, ...] = FFN_SHARES
    bld_steps: int = bld.BLDConfig.steps
    bld_lr: float = bld.BLDConfig.lr
    distill_tokens: int = defaults.DISTILL_TOKENS
    hidden_weight: float = 0.0  # Puzzle's hidden-state term beside the KL (normalized MSE per layer; needs the parent live)
    alternatives: int = 1
    workload: Workload = field(default_factory=Workload)
    parallel: str = "auto"  # under torchrun: how BLD and the global distillation split (bld.BLDConfig.parallel)

    def __post_init__(self) -> None:
        check_parallel(self.parallel)

    def limits(self) -> solve.Limits:
        if self.budget_s is None and self.ttft_s is None and self.memory_bytes is None:
            raise ShrinkError("Puzzle needs a budget: time per token (--budget), time to first token (--ttft) or --memory.")
        return solve.Limits(self.budget_s, self.ttft_s, self.memory_bytes)


def _costed_spec(loaded: Any, settings: PuzzleSettings) -> Any:
    return loaded.spec.with_formats(weights=settings.weights) if settings.weights else loaded.spec


def _keyed(table: dict[tuple[int, Variant], float]) -> dict[str, float]:
    return {f"{i}|{v.key}": value for (i, v), value in table.items()}


def unkeyed(data: dict[str, float]) -> dict[tuple[int, Variant], float]:
    """_keyed's "layer|sub:name" keys (a report's, a scores file's) read back as (layer, Variant)."""
    out = {}
    for key, value in data.items():
        i, variant = key.split("|")
        sub, name = variant.split(":")
        out[(int(i), Variant(sub, name))] = value
    return out


def search(loaded: Any, split: Any, settings: PuzzleSettings, work: Path, hooks: Hooks) -> tuple[Any, dict]:
    """Everything up to the assembled (not yet globally distilled) model; returns it and the report."""
    lib = library(loaded.spec, settings.ffn_shares)
    profile = get_profile(settings.target)
    limits = settings.limits()
    costed = _costed_spec(loaded, settings)
    fixed, table = solve.costs(costed, lib, profile, settings.workload)
    solve.solve({k: 0.0 for k in table}, table, fixed, limits)  # an impossible budget fails before any training
    hooks.status(f"Scoring importance on {split.calibration.numel():,} calibration tokens")
    current = world()  # under torchrun: importance, BLD and the scores are split over the processes
    importance = cached_score(loaded, split.calibration, current=current)
    errors = bld.run(loaded, split.calibration, lib, importance, work / "bld",
                     bld.BLDConfig(steps=settings.bld_steps, lr=settings.bld_lr, parallel=settings.parallel),
                     current=current, status=hooks.status)
    score_file = work / "scores.json"
    if current.from_main(score_file.is_file()):  # every process takes the same path (the scores are a collective)
        kl = unkeyed(json.loads(score_file.read_text()))
    else:
        candidates = {(i, v): bld.load_variant(loaded, i, v, work / "bld", importance)
                      for i, variants in enumerate(lib) for v in variants}
        kl = scores.replace_one_block(loaded, split.evaluation[:SCORE_SEQUENCES], candidates, status=hooks.status,
                                      current=current)
        if current.is_main:
            atomic_write_text(score_file, json.dumps(_keyed(kl), indent=1))
    hooks.status("Choosing one variant per block (mixed-integer program)")
    # rank 0's choice for every process: on `host` each process may have measured its own rates
    solutions = current.from_main(solve.solve(kl, table, fixed, limits, alternatives=settings.alternatives))
    child = assemble(loaded, solutions[0].choice, work / "bld", importance)
    parent = estimate(costed, profile, settings.workload)
    chosen = estimate(solve.assembled_spec(costed, solutions[0].choice), profile, settings.workload)
    report = {
        "target": profile.name, "formats_costed": costed.formats.weights,
        "library": {f"layer {i}": [v.key for v in variants] for i, variants in enumerate(lib)},
        "bld_normalized_mse": {f"{i}|{k}": e for i, errs in errors.items() for k, e in errs.items()},
        "replace_one_block_kl": _keyed(kl),
        "solutions": [s.to_dict() for s in solutions],
        "parent_estimated": {"decode_s": parent.tpot_s, "prefill_s": parent.ttft_s},
        "chosen_estimated": {"decode_s": chosen.tpot_s, "prefill_s": chosen.ttft_s,
                             "memory_bytes": chosen.memory.weights_bytes + chosen.memory.kv_cache_bytes},
        "limits": {"decode_s": limits.decode_s, "prefill_s": limits.prefill_s, "memory_bytes": limits.memory_bytes},
        "kind": "estimated costs, measured KL and MSE",
    }
    return child, report


def puzzle(loaded: Any, split: Any, settings: PuzzleSettings, work: Path, hooks: Hooks) -> tuple[Any, dict]:
    """Search, assemble, then distil the assembled model globally towards the parent (KL on the
    parent's cached top-k; Puzzle adds a hidden-state term, which needs the parent live)."""
    child, report = search(loaded, split, settings, work, hooks)
    if settings.distill_tokens > 0:
        config = distill_config(tokens=settings.distill_tokens, hidden_weight=settings.hidden_weight,
                                parallel=settings.parallel)
        result = distill(child, loaded, split, config, work / "distill", hooks)
        report["distillation"] = asdict(result)
    return child, report
