"""The Puzzle step: library -> blockwise distillation -> replace-one-block scores -> costs on the target
-> mixed-integer choice -> assembled model -> global distillation. What `shrink puzzle` and a recipe's
`puzzle` step run; every stage's result is kept under `work` so a killed run resumes after the last
finished stage (trained variants one by one, the scores as one file).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from shrink.compress.distill.parallel import check_parallel, world
from shrink.compress.importance import cached_score
from shrink.compress.puzzle import bld, scores, solve
from shrink.compress.puzzle.assemble import assemble
from shrink.compress.puzzle.library import FFN_SHARES, Variant, library, variant_layer
from shrink.errors import ShrinkError
from shrink.export.backend import costed_spec, runtime_of
from shrink.export.gguf_layout import LLAMA_SHAPED
from shrink.flows import defaults
from shrink.flows.steps import Hooks, distill, distill_config
from shrink.model import weights_hash
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate
from shrink.storage import atomic_write_text

SCORE_SEQUENCES = 4  # held-out sequences the replace-one-block KL is measured on (each score reruns a suffix)


@dataclass(frozen=True)
class PuzzleSettings:
    target: str
    budget_s: float | None = None  # time per output token, estimated on the target
    ttft_s: float | None = None
    memory_bytes: float | None = None  # as `shrink estimate` totals it: weights, KV cache or state, activations
    weights: str | None = None  # the format the blocks will be stored in (costs); None: the model's own
    ffn_shares: tuple[float, ...] = FFN_SHARES
    bld_steps: int = bld.BLDConfig.steps
    bld_lr: float = bld.BLDConfig.lr
    distill_tokens: int = defaults.DISTILL_TOKENS
    hidden_weight: float = 0.0  # Puzzle's hidden-state term beside the KL (normalized MSE per layer; needs the parent live)
    alternatives: int = 1
    workload: Workload = field(default_factory=Workload)
    parallel: str = "auto"  # under torchrun: how BLD and the global distillation split (bld.BLDConfig.parallel)
    # the artifact the child becomes (gguf, onnx): only variants its runtime runs are offered, costed as that
    # export stores them with its runtime's kernels, `weights` then naming a quantization family (the planner's)
    export: str | None = None

    def __post_init__(self) -> None:
        check_parallel(self.parallel)

    def limits(self) -> solve.Limits:
        if self.budget_s is None and self.ttft_s is None and self.memory_bytes is None:
            raise ShrinkError("Puzzle needs a budget: time per token (--budget), time to first token (--ttft) or --memory.")
        return solve.Limits(self.budget_s, self.ttft_s, self.memory_bytes)


def costed_parent(spec: Any, settings: PuzzleSettings) -> Any:
    """The parent's spec in the formats the variants are costed in."""
    if settings.export is not None:
        return costed_spec(spec, settings.weights, settings.export)
    return spec.with_formats(weights=settings.weights) if settings.weights else spec


def kernels(settings: PuzzleSettings) -> str | None:
    """The runtime whose measured kernels cost the variants (None: the target's first)."""
    return None if settings.export is None else runtime_of(settings.export)


def runnable_library(spec: Any, settings: PuzzleSettings) -> list[list[Variant]]:
    """The variant library, less what the artifact's runtime cannot run: llama.cpp runs per-layer variants
    only through `deci` (Llama-shaped models, no linear FFN) or `granitehybrid` (Mamba2 mixers); ONNX
    graphs carry no recurrent state, so no Mamba2 mixer there."""
    lib = library(spec, settings.ffn_shares)
    if settings.export == "gguf":
        if spec.family not in LLAMA_SHAPED:
            raise ShrinkError(f"llama.cpp runs per-layer block variants only in Llama-shaped models (its 'deci' "
                              f"architecture), so a Puzzle child of this {spec.family} model cannot be a GGUF; "
                              f"target an ONNX Runtime profile (e.g. h100-sxm) instead.")
        dropped = {"ffn:linear"}
    elif settings.export == "onnx":
        dropped = {"attention:mamba2"}
    else:
        dropped = set()
    return [[v for v in variants if v.key not in dropped] for variants in lib]


@dataclass(frozen=True)
class Program:
    """What the mixed-integer program chooses from: the fixed cost, each variant's cost, the limits."""
    fixed: solve.Cost
    table: dict[tuple[int, Variant], solve.Cost]
    limits: solve.Limits

    def check(self) -> None:
        """ShrinkError when no choice meets the limits, whatever the scores: before any training."""
        solve.solve({key: 0.0 for key in self.table}, self.table, self.fixed, self.limits)

    def solve(self, kl: dict, alternatives: int = 1) -> list[Any]:
        return solve.solve(kl, self.table, self.fixed, self.limits, alternatives=alternatives)


def program(spec: Any, lib: list[list[Variant]], profile: Any, settings: PuzzleSettings) -> Program:
    """The program on `profile` as settings say the child is stored (`shrink puzzle`, the planner and a
    planned run's puzzle step all choose from this, so they choose alike). With an export named, a variant
    whose rows its format's blocks do not divide (a narrowed FFN of 832 in 256-element blocks) is left out:
    the export would store it in another format than the one it was costed in. The budget's memory line
    counts activations too (as `shrink estimate`'s total): the parent's, the widest, are set aside."""
    costed = costed_parent(spec, settings)
    fixed, table = solve.costs(costed, lib, profile, settings.workload, kernels(settings))
    if settings.export is not None:
        table = {(i, v): cost for (i, v), cost in table.items() if not _falls_back(spec, i, v, costed, settings)}
    limits = settings.limits()
    if limits.memory_bytes is not None:
        activations = estimate(costed, profile, settings.workload, kernels(settings)).memory.activation_bytes
        limits = replace(limits, memory_bytes=limits.memory_bytes - activations)
    return Program(fixed, table, limits)


def _falls_back(spec: Any, i: int, variant: Variant, costed: Any, settings: PuzzleSettings) -> bool:
    """Whether layer i as `variant` has rows the export's format does not take where the parent's are taken."""
    alone = replace(spec, layers=(variant_layer(spec.layers[i], variant),))
    try:
        ops = set(costed_spec(alone, settings.weights, settings.export).formats.ops)
    except ShrinkError:  # rows no format of the runtime takes
        return True
    return bool(ops - set(costed.formats.ops))


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


def search(loaded: Any, split: Any, settings: PuzzleSettings, work: Path, hooks: Hooks,
           profile: Any = None) -> tuple[Any, dict]:
    """Everything up to the assembled (not yet globally distilled) model; returns it and the report.
    `profile`: the target as already resolved (a plan's calibrated host); default: settings.target's."""
    lib = runnable_library(loaded.spec, settings)
    profile = profile or get_profile(settings.target)
    chooser = program(loaded.spec, lib, profile, settings)
    chooser.check()  # an impossible budget fails before any training
    importance, errors, kl = trained_scores(loaded, split, lib, settings, work, hooks)
    hooks.status("Choosing one variant per block (mixed-integer program)")
    # rank 0's choice for every process: on `host` each process may have measured its own rates
    solutions = world().from_main(chooser.solve(kl, settings.alternatives))
    limits = chooser.limits
    child = assemble(loaded, solutions[0].choice, work / "bld", importance)
    costed = costed_parent(loaded.spec, settings)
    parent = estimate(costed, profile, settings.workload, kernels(settings))
    chosen = estimate(solve.assembled_spec(costed, solutions[0].choice), profile, settings.workload, kernels(settings))
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


def trained_scores(loaded: Any, split: Any, lib: list[list[Variant]], settings: PuzzleSettings, work: Path,
                   hooks: Hooks) -> tuple[Any, dict, dict[tuple[int, Variant], float]]:
    """(FFN importance, BLD's normalized MSE per variant, replace-one-block KL per variant): the costly,
    target-independent part of the search, kept under `work` (the variants under bld/, the scores in
    scores.json) so a rerun, or a run's puzzle step after the planner made them, reads them back."""
    current = world()  # under torchrun: importance, BLD and the scores are split over the processes
    refusal = current.from_main(_claim(work, _fingerprint(loaded, split, settings)) if current.is_main else None)
    if refusal:
        raise ShrinkError(refusal)
    hooks.status(f"Scoring importance on {split.calibration.numel():,} calibration tokens")
    importance = cached_score(loaded, split.calibration, current=current)
    errors = bld.run(loaded, split.calibration, lib, importance, work / "bld",
                     bld.BLDConfig(steps=settings.bld_steps, lr=settings.bld_lr, parallel=settings.parallel),
                     current=current, status=hooks.status)
    score_file = work / "scores.json"
    wanted = {(i, v) for i, variants in enumerate(lib) for v in variants}
    kept = unkeyed(json.loads(score_file.read_text())) if current.is_main and score_file.is_file() else {}
    if current.from_main(wanted <= set(kept)):  # every process takes the same path (the scores are a collective)
        kl = current.from_main(kept)
    else:
        candidates = {(i, v): bld.load_variant(loaded, i, v, work / "bld", importance)
                      for i, variants in enumerate(lib) for v in variants}
        kl = scores.replace_one_block(loaded, split.evaluation[:SCORE_SEQUENCES], candidates, status=hooks.status,
                                      current=current)
        if current.is_main:
            atomic_write_text(score_file, json.dumps(_keyed(kl), indent=1))
    return importance, errors, kl


FINGERPRINT = "made-from.json"  # what the variants and scores under a work directory were made from


def _fingerprint(loaded: Any, split: Any, settings: PuzzleSettings) -> dict:
    def digest(tokens: Any) -> str:
        return hashlib.sha256(tokens.contiguous().numpy().tobytes()).hexdigest()[:24]

    return {"weights": weights_hash(loaded.model), "calibration text": digest(split.calibration),
            "held-out text": digest(split.evaluation[:SCORE_SEQUENCES]),
            "bld": {"steps": settings.bld_steps, "lr": settings.bld_lr}, "ffn shares": list(settings.ffn_shares)}


def _claim(work: Path, made_from: dict) -> str | None:
    """Why `work` cannot be reused (its variants were made from another model, text or setting), or None
    after recording what this run makes them from."""
    path = work / FINGERPRINT
    if path.is_file():
        kept = json.loads(path.read_text())
        differ = [key for key in made_from if kept.get(key) != made_from[key]]
        if differ:
            return (f"'{work}' holds Puzzle variants and scores made from another {', '.join(differ)}; remove it or "
                    f"choose another work directory (-o for shrink run, --work for shrink puzzle).")
        return None
    work.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(made_from, indent=1))
    return None


def puzzle(loaded: Any, split: Any, settings: PuzzleSettings, work: Path, hooks: Hooks,
           profile: Any = None) -> tuple[Any, dict]:
    """Search, assemble, then distil the assembled model globally towards the parent (KL on the
    parent's cached top-k; Puzzle adds a hidden-state term, which needs the parent live)."""
    child, report = search(loaded, split, settings, work, hooks, profile)
    if settings.distill_tokens > 0:
        config = distill_config(tokens=settings.distill_tokens, hidden_weight=settings.hidden_weight,
                                parallel=settings.parallel)
        result = distill(child, loaded, split, config, work / "distill", hooks)
        report["distillation"] = asdict(result)
    return child, report


@dataclass
class PuzzleShape:
    """A Puzzle architecture the planner weighs: one variant per sub-block, built from the variants trained
    under `work` (what a run's puzzle step, pointed at the same `work`, chooses again)."""
    choice: dict[int, dict[str, Variant]]
    solution: dict  # solve.Solution.to_dict(): the variants, summed scores and costs
    work: Path

    @classmethod
    def of(cls, solution: Any, work: Path) -> "PuzzleShape":
        return cls(solution.choice, solution.to_dict(), work)

    @property
    def key(self) -> str:
        return json.dumps(self.solution["layers"])

    @property
    def label(self) -> str:
        chosen = [v for subs in self.choice.values() for v in subs.values()]
        return f"Puzzle ({sum(v.name != 'parent' for v in chosen)} of {len(chosen)} blocks replaced)"

    def build(self, loaded: Any, importance: Any) -> Any:
        """The assembled child (a copy: `loaded` is left as it was)."""
        return assemble(loaded, self.choice, self.work / "bld", importance)

    def to_dict(self) -> dict:
        return {"puzzle": self.solution, "work": str(self.work), "label": self.label}
