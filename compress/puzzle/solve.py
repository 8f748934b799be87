"""Costs of every variant on the target, and the mixed-integer program choosing one per sub-block
(Puzzle App. B).

A variant's cost is what the roofline estimate of a one-layer model holding only that sub-block
adds to the estimate of the same model with one empty layer (a runtime's measured cost per layer is
then paid once per layer, in the fixed part): per-operator costs add up, so the chosen
architecture's estimate is the fixed part (embedding, final norm, lm_head, the norms) plus the sum
of its variants' costs, exactly. The program minimises the summed replace-one-block scores subject
to time per output token, time to first token and memory (weights, KV cache), with binary x[i, j]:
layer i's sub-block takes variant j, one per sub-block. With Mamba2 mixers in the library a binary h
says whether the child is a GraniteMoeHybrid: a Mamba2 mixer needs h, any other non-parent variant
needs 1 - h (library.holds_together).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from shrink.archspec import ArchSpec, LayerSpec
from shrink.compress.puzzle.library import Variant, holds_together, variant_layer
from shrink.errors import ShrinkError
from shrink.hardware.profiles import Profile
from shrink.hardware.roofline import Workload, estimate


@dataclass(frozen=True)
class Cost:
    decode_s: float
    prefill_s: float
    memory_bytes: float  # weights plus KV cache (or state) at the workload's context

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.decode_s + other.decode_s, self.prefill_s + other.prefill_s,
                    self.memory_bytes + other.memory_bytes)


@dataclass(frozen=True)
class Limits:
    decode_s: float | None = None
    prefill_s: float | None = None
    memory_bytes: float | None = None


def _of(spec: ArchSpec, profile: Profile, workload: Workload, runtime: str | None) -> Cost:
    e = estimate(spec, profile, workload, runtime)
    return Cost(e.decode.time_s, e.prefill.time_s, e.memory.weights_bytes + e.memory.kv_cache_bytes
                + e.memory.ssm_state_bytes)


def _minus(a: Cost, b: Cost) -> Cost:
    return Cost(a.decode_s - b.decode_s, a.prefill_s - b.prefill_s, a.memory_bytes - b.memory_bytes)


def costs(spec: ArchSpec, library: list[list[Variant]], profile: Profile, workload: Workload = Workload(),
          runtime: str | None = None) -> tuple[Cost, dict[tuple[int, Variant], Cost]]:
    """(fixed cost, cost of each (layer, variant)) in `spec`'s formats on `profile`, with the measured
    kernels of `runtime` where the profile has them (default: the target's first runtime)."""
    bare = LayerSpec(mixer=None, ffn=None, norms=0)
    empty = _of(replace(spec, layers=(bare,)), profile, workload, runtime)
    norms_only = [LayerSpec(mixer=None, ffn=None, norms=layer.norms) for layer in spec.layers]
    fixed = _of(replace(spec, layers=tuple(norms_only)), profile, workload, runtime)
    table = {}
    for i, variants in enumerate(library):
        for v in variants:
            sub = variant_layer(replace(spec.layers[i], norms=0), v)
            alone = replace(bare, mixer=sub.mixer) if v.sub == "attention" else replace(bare, ffn=sub.ffn)
            table[(i, v)] = _minus(_of(replace(spec, layers=(alone,)), profile, workload, runtime), empty)
    return fixed, table


def assembled_spec(spec: ArchSpec, choice: dict[int, dict[str, Variant]]) -> ArchSpec:
    """The ArchSpec with each layer's chosen attention and FFN variants."""
    layers = []
    for i, layer in enumerate(spec.layers):
        for v in choice[i].values():
            layer = variant_layer(layer, v)
        layers.append(layer)
    return replace(spec, layers=tuple(layers))


@dataclass
class Solution:
    choice: dict[int, dict[str, Variant]]  # layer -> {"attention": variant, "ffn": variant}
    score: float
    cost: Cost

    def to_dict(self) -> dict:
        return {"layers": [{sub: v.name for sub, v in self.choice[i].items()} for i in sorted(self.choice)],
                "score": self.score, "decode_s": self.cost.decode_s, "prefill_s": self.cost.prefill_s,
                "memory_bytes": self.cost.memory_bytes}


def choice_from_names(layers: list[dict[str, str]]) -> dict[int, dict[str, Variant]]:
    """Solution.to_dict()'s "layers" read back as a choice."""
    return {i: {sub: Variant(sub, name) for sub, name in subs.items()} for i, subs in enumerate(layers)}


def solve(scores: dict[tuple[int, Variant], float], table: dict[tuple[int, Variant], Cost], fixed: Cost,
          limits: Limits, alternatives: int = 1, max_overlap: float = 0.8) -> list[Solution]:
    """The best choice (and up to `alternatives - 1` more, each sharing at most `max_overlap` of its
    sub-block choices with every earlier one) under `limits`; ShrinkError when none meets them."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp

    keys = list(table)
    groups = sorted({(i, v.sub) for i, v in keys})
    rows, lower, upper = [], [], []
    for group in groups:  # one variant per sub-block
        rows.append([1.0 if (i, v.sub) == group else 0.0 for i, v in keys])
        lower.append(1.0)
        upper.append(1.0)
    for field in ("decode_s", "prefill_s", "memory_bytes"):
        limit = getattr(limits, field)
        if limit is not None:
            # in units of the whole limit: seconds and bytes differ by 1e15, and the solver's
            # feasibility tolerance is absolute
            rows.append([getattr(table[k], field) / limit for k in keys])
            lower.append(-np.inf)
            upper.append((limit - getattr(fixed, field)) / limit)
    objective = [scores[k] for k in keys]
    if any(v.name == "mamba2" for _, v in keys):  # one more column: h, the child is a GraniteMoeHybrid
        rows = [row + [0.0] for row in rows]
        for n, (_, v) in enumerate(keys):
            if v.name != "parent":  # x - h <= 0 for a Mamba2 mixer, x + h <= 1 for any other variant
                rows.append([1.0 if m == n else 0.0 for m in range(len(keys))] + [-1.0 if v.name == "mamba2" else 1.0])
                lower.append(-np.inf)
                upper.append(0.0 if v.name == "mamba2" else 1.0)
        objective.append(0.0)
    found: list[Solution] = []
    for _ in range(alternatives):
        result = milp(np.array(objective), integrality=np.ones(len(objective)), bounds=Bounds(0, 1),
                      constraints=LinearConstraint(np.array(rows), lower, upper))
        if result.x is None:
            if not found:
                raise ShrinkError(_infeasible(table, fixed, limits, groups))
            break
        chosen = [k for k, x in zip(keys, result.x) if x > 0.5]
        found.append(_solution(chosen, scores, table, fixed))
        rows.append([1.0 if k in chosen else 0.0 for k in keys] + [0.0] * (len(objective) - len(keys)))
        lower.append(-np.inf)
        upper.append(float(int(max_overlap * len(groups))))
    return found


def _solution(chosen: list[tuple[int, Variant]], scores: dict, table: dict, fixed: Cost) -> Solution:
    choice: dict[int, dict[str, Variant]] = {}
    total = fixed
    for i, v in chosen:
        choice.setdefault(i, {})[v.sub] = v
        total = total + table[(i, v)]
    return Solution(choice, sum(scores[k] for k in chosen), total)


def _infeasible(table: dict, fixed: Cost, limits: Limits, groups: list) -> str:
    cheapest = fixed
    for group in groups:
        options = [c for (i, v), c in table.items() if (i, v.sub) == group]
        cheapest = cheapest + Cost(min(c.decode_s for c in options), min(c.prefill_s for c in options),
                                   min(c.memory_bytes for c in options))
    parts = [f"{name} {getattr(cheapest, f) * scale:.3g} {unit} against {getattr(limits, f) * scale:.3g} {unit}"
             for f, name, scale, unit in (("decode_s", "time per token", 1e3, "ms"), ("prefill_s", "time to first token", 1e3, "ms"),
                                          ("memory_bytes", "memory", 1e-9, "GB"))
             if getattr(limits, f) is not None and getattr(cheapest, f) > getattr(limits, f)]
    return ("No choice of block variants meets the budget: even every layer at its cheapest variant needs "
            + "; ".join(parts or ["more than the limits together allow"]) + " (estimated).")


def brute_force(scores: dict, table: dict, fixed: Cost, limits: Limits) -> Solution | None:
    """Every combination, for checking the program on small cases."""
    groups: dict[tuple[int, str], list] = {}
    for i, v in table:
        groups.setdefault((i, v.sub), []).append((i, v))
    best = None
    for combo in itertools.product(*groups.values()):
        if not holds_together([v for _, v in combo]):
            continue
        s = _solution(list(combo), scores, table, fixed)
        ok = all(getattr(limits, f) is None or getattr(s.cost, f) <= getattr(limits, f) + 1e-12
                 for f in ("decode_s", "prefill_s", "memory_bytes"))
        if ok and (best is None or s.score < best.score):
            best = s
    return best
