"""The planner's Puzzle candidates (`shrink run --target T --budget X --puzzle`).

Puzzle's costly part (blockwise distillation of every variant, replace-one-block scores) does not depend
on the format, so it runs once, in the run directory, and only when some format admits a Puzzle
architecture within the budget at all (the program is first solved with every score 0). Then for each
format the target's runtime stores, the program chooses the architecture under the budget with that
format's costs: a candidate like any other, costed on the target as exported, its proxy KL measured after
the same short recovery as a prune shape's (flows/candidates.py). The run's puzzle step reads the same
trained variants and scores back and makes the same choice.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from shrink.compress.puzzle import solve
from shrink.errors import ShrinkError
from shrink.flows.candidates import Candidate, TargetBudget, cost, target_runtime
from shrink.flows.puzzle import PuzzleSettings, PuzzleShape, program, runnable_library, trained_scores
from shrink.flows.steps import Hooks
from shrink.numformats import runtime_families


def puzzle_candidates(loaded: Any, split: Any, profile: Any, workload: Any, budget: TargetBudget, work: Path,
                      hooks: Hooks) -> tuple[list[Candidate], dict]:
    """(one candidate per format with a Puzzle architecture within the budget, what was offered and why)."""
    runtime = target_runtime(profile)
    base = PuzzleSettings(target=profile.name, budget_s=budget.tpot_s, ttft_s=budget.ttft_s,
                          memory_bytes=budget.memory_bytes, workload=workload, export=runtime)
    try:
        lib = runnable_library(loaded.spec, base)
    except ShrinkError as err:  # a family Puzzle does not take, or a runtime that cannot run its children
        return [], {"offered": False, "why": str(err)}
    programs, why = {}, []
    for family in runtime_families(runtime):
        try:
            chooser = program(loaded.spec, lib, profile, replace(base, weights=family))
        except ShrinkError as err:  # no row of the model divides into this format's blocks
            why.append(f"{family or 'unquantized'}: {err}")
            continue
        try:
            chooser.check()
        except ShrinkError:  # even the cheapest variants miss the budget in this format
            why.append(f"{family or 'unquantized'}: no choice of variants meets the budget (estimated)")
            continue
        programs[family] = chooser
    if not programs:
        return [], {"offered": True, "why": "no Puzzle architecture meets the budget in any format: " + "; ".join(why)}
    hooks.status("Puzzle: training every block variant and scoring it (kept for the run's puzzle step)")
    _, _, kl = trained_scores(loaded, split, lib, base, work, hooks)
    shapes: dict[str, PuzzleShape] = {}
    candidates = []
    whole = loaded.spec.param_counts().non_embedding
    for family, chooser in programs.items():
        solution = chooser.solve(kl)[0]
        found = PuzzleShape.of(solution, work)
        shape = shapes.setdefault(found.key, found)  # formats choosing alike share one shape, measured once
        spec = solve.assembled_spec(loaded.spec, solution.choice)
        keep = spec.param_counts().non_embedding / whole
        candidates.append(cost(Candidate(keep, "puzzle", family, runtime, shape), spec, profile, workload, budget))
    return candidates, {"offered": True, "formats": [f or "unquantized" for f in programs], "work": str(work),
                        "without_a_solution": why}
