"""The candidates of the budget-driven planner behind `shrink run MODEL --target T --budget X`.

Candidates are prune shapes (a fraction of the non-embedding parameters kept, on the width or the
depth axis, shaped by the same rule as `shrink prune --params`) times the weight formats the target's
runtime executes (llama.cpp: GGUF F16/Q8_0/NVFP4/MXFP4/Q4_0/TQ2_0/Q1_0; ONNX Runtime: f32/int8/int4).
Each is costed with the roofline model on the target, exactly as it would be exported (a GGUF keeps
its vocabulary tensors on Q8_0, see compress/quant/plan.py). Those within the budget are ranked by a
quality proxy measured on held-out text, and the best becomes a recipe (flows/plan.py: recipe_for).

The quality proxy, and why: a candidate's predicted KL to the original is the KL of its prune shape
after a short distillation (what `shrink prune --search` ranks shapes by) plus the KL of its format
after PTQ of the original weights. Both are measured; adding them treats the two errors as
independent small perturbations, which is what the first-order expansion of KL gives. It ranks
candidates; it does not predict the final KL, which distillation and QAD then lower. Each shape and
each format is measured once however many candidates share it.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from shrink.compress import kvshare, swiftkv
from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.pruning import ranked_shape
from shrink.compress.quant.plan import make_plan
from shrink.compress.quant.ptq import calibrate
from shrink.compress.quant.student import fake_quantize, materialize
from shrink.compress.search import Budget, apply, recovered_kl
from shrink.errors import ShrinkError
from shrink.export.backend import costed_spec, runtime_of
from shrink.export.costing import op_row_lengths
from shrink.export.gguf_layout import choose_layout
from shrink.flows.gguf_search import narrowest_vocabulary
from shrink.hardware.roofline import Workload, estimate
from shrink.model import load
from shrink.numformats import get_format, runtime_families
from shrink.units import fmt_bytes, fmt_time, parse_duration, parse_size

KEEPS = (1.0, 0.8, 0.6, 0.4)  # fractions of the non-embedding parameters
# K/V transforms (compress/kvshare.py, compress/swiftkv.py) buy time to first token and cache memory, not time
# per token: offered where the budget has a TTFT or memory line, and on ONNX targets only (llama.cpp has no
# architecture that runs them, so their GGUF export is refused)
KV_TRANSFORMS = {"kv-share": "KV sharing", "single-input-kv": "SingleInputKV"}
AXES = ("width", "depth")
RUNTIME_EXPORTS = {"llama.cpp": "gguf", "onnxruntime": "onnx"}


# --- what the user asks for ---

@dataclass(frozen=True)
class TargetBudget:
    tpot_s: float | None = None  # time per output token, estimated on the target
    ttft_s: float | None = None  # time to first token
    memory_bytes: float | None = None  # weights + KV cache + state + activations

    @classmethod
    def parse(cls, texts: list[str]) -> "TargetBudget":
        """'20ms', 'tpot=20ms', 'ttft=200ms', 'mem=2GB', given separately or joined by commas."""
        values: dict[str, float] = {}
        for item in (part.strip() for text in texts for part in text.split(",") if part.strip()):
            key, _, value = item.rpartition("=")
            key = key.strip().lower() or "tpot"
            if key in ("tpot", "latency", "decode"):
                values["tpot_s"] = parse_duration(value, "--budget")
            elif key == "ttft":
                values["ttft_s"] = parse_duration(value, "--budget ttft=")
            elif key in ("mem", "memory"):
                values["memory_bytes"] = parse_size(value, "--budget mem=")
            else:
                raise ShrinkError(f"--budget takes 20ms (per output token), ttft=200ms or mem=2GB, not '{item}'.")
        if not values:
            raise ShrinkError("Give a --budget: a time per output token (20ms), ttft=200ms or mem=2GB.")
        return cls(**values)

    def to_dict(self) -> dict:
        return {"tpot_s": self.tpot_s, "ttft_s": self.ttft_s, "memory_bytes": self.memory_bytes}


def parse_workload(text: str | None) -> Any:
    """'batch=1,prompt=512,gen=128' (any subset) -> a roofline Workload."""
    if not text:
        return Workload()
    names = {"batch": "batch", "prompt": "prompt_len", "gen": "gen_len", "generate": "gen_len"}
    values = {}
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\w+)\s*=\s*(\d+)\s*", item)
        if not match or match.group(1) not in names:
            raise ShrinkError(f"--workload takes batch=N,prompt=N,gen=N; '{item.strip()}' is not one of them.")
        values[names[match.group(1)]] = int(match.group(2))
    return Workload(**values)


# --- candidates ---

TIME_LINE = "time per token"  # the budget line a candidate's decode time misses


@dataclass
class Candidate:
    keep: float
    axis: str  # width, depth, puzzle (flows/puzzle_plan.py), or "-" for the unpruned model
    format: str | None  # a quantization family (compress/quant/plan.py), None: unquantized
    runtime: str  # gguf or onnx
    shape: Any = None  # compress.search.Plan (flows.puzzle.PuzzleShape for puzzle), None for the unpruned model
    tpot_s: float = 0.0  # the figures below hold only once `costed`
    ttft_s: float = 0.0
    memory_bytes: float = 0.0
    weights_bytes: float = 0.0
    costed: bool = False  # False: rejected before the roofline saw it (llama.cpp cannot run the shape, say)
    roofline_tpot_s: float | None = None  # the roofline's own time when an anchor (flows/anchors.py) set tpot_s
    anchor: dict | None = None  # the file of the model measured in this run that tpot_s is scaled by
    misses: list[str] = field(default_factory=list)  # budget lines it misses (estimated)
    rejected: str | None = None  # why it cannot be built as costed
    kl_shape: float | None = None  # measured proxy parts
    kl_format: float | None = None
    quantizer: dict | None = None  # a llama.cpp quantizer option (flows/gguf_search.py), made and measured
    kv: str | None = None  # a K/V transform of KV_TRANSFORMS applied after pruning, None: none
    kl_kv: float | None = None  # its measured proxy part (0 without one)

    @property
    def label(self) -> str:
        shape = "unpruned" if self.shape is None else f"{self.axis} {self.keep:.0%}"
        if self.axis == "puzzle":
            shape = self.shape.label
        if self.quantizer is not None:
            return f"{shape}, llama.cpp {self.quantizer['label']}"
        kv = f" + {KV_TRANSFORMS[self.kv]}" if self.kv else ""
        return f"{shape}{kv}, {self.format or {'gguf': 'f16', 'onnx': 'f32'}.get(self.runtime, 'bf16')}"

    @property
    def fits(self) -> bool:
        return not self.misses and self.rejected is None

    @property
    def predicted_kl(self) -> float | None:
        if self.kl_shape is None or self.kl_format is None or (self.kv and self.kl_kv is None):
            return None
        return self.kl_shape + self.kl_format + (self.kl_kv or 0.0)

    def to_dict(self) -> dict:
        return {"label": self.label, "keep": self.keep, "axis": self.axis, "format": self.format,
                "runtime": self.runtime, "shape": self.shape.to_dict() if self.shape else None,
                # null, not 0, for a candidate never costed: a zero would read as an instant model
                **{f"{name}_estimated": getattr(self, name) if self.costed else None
                   for name in ("tpot_s", "ttft_s", "memory_bytes", "weights_bytes")},
                "misses": self.misses, "rejected": self.rejected, "kl_shape_measured": self.kl_shape,
                "kl_format_measured": self.kl_format, "kv": self.kv, "kl_kv_measured": self.kl_kv,
                "predicted_kl": self.predicted_kl, "quantizer": self.quantizer,
                "tpot_s_roofline": self.roofline_tpot_s, "anchor": self.anchor}


def target_runtime(profile: Any) -> str:
    for runtime in profile.runtimes:
        if runtime in RUNTIME_EXPORTS:
            return RUNTIME_EXPORTS[runtime]
    raise ShrinkError(f"Target '{profile.name}' names no runtime shrink exports to (llama.cpp or onnxruntime).")


def _fallback(spec: Any, costed: Any) -> str | None:
    """Why a candidate is not built as costed: part of it falls back to another format (the operators
    `costed_spec` gave a format of their own)."""
    if costed.formats.ops:
        wanted = get_format(costed.formats.weights)
        rows = sorted(r for op, _ in costed.formats.ops for r in op_row_lengths(spec)[op] if r % wanted.block)
        return (f"rows of {rows[0]} do not divide into {wanted.name}'s {wanted.block}-element blocks, so part of the "
                "model would fall back to another format; not costed as this format")
    return None


def cost(candidate: Candidate, spec: Any, profile: Any, workload: Any, budget: TargetBudget,
         vocabulary: str | None = None) -> Candidate:
    """Fill in the candidate's roofline figures on the target and the budget lines it misses
    (`vocabulary`: the embedding and output projection costed in that format instead)."""
    try:
        costed = costed_spec(spec, candidate.format, candidate.runtime)
    except ShrinkError as err:  # rows no format of the runtime's fallback chain takes (ONNX blocks have none)
        candidate.rejected = str(err)
        return candidate
    if candidate.runtime == "gguf":
        try:  # what llama.cpp cannot run is no candidate (a depth cut out of Gemma 3's window pattern, say)
            choose_layout(spec, pad_to_uniform=False)
        except ShrinkError as err:
            candidate.rejected = str(err)
            return candidate
    if vocabulary is not None:
        costed = replace(costed, formats=replace(costed.formats, embeddings=vocabulary, lm_head=None))
    est = estimate(costed, profile, workload, runtime_of(candidate.runtime))  # with its runtime's kernels where measured
    candidate.tpot_s = est.tpot_s
    candidate.ttft_s = est.ttft_s
    candidate.memory_bytes = est.memory.total_bytes
    candidate.weights_bytes = est.memory.weights_bytes
    candidate.costed = True
    candidate.rejected = _fallback(spec, costed)
    if not est.memory.fits:
        candidate.misses.append("memory capacity")
    if budget.tpot_s is not None and candidate.tpot_s > budget.tpot_s:
        candidate.misses.append(TIME_LINE)
    if budget.ttft_s is not None and candidate.ttft_s > budget.ttft_s:
        candidate.misses.append("time to first token")
    if budget.memory_bytes is not None and candidate.memory_bytes > budget.memory_bytes:
        candidate.misses.append("memory")
    return candidate


def enumerate_candidates(loaded: Any, importance: Any, profile: Any, workload: Any, budget: TargetBudget,
                         keeps=KEEPS, axes=AXES) -> list[Candidate]:
    ranking = importance.layers.argsort(descending=True).tolist()
    return candidates_for(loaded.spec, ranking, profile, workload, budget, keeps, axes)


def candidates_for(model_spec: Any, ranking: list[int], profile: Any, workload: Any, budget: TargetBudget,
                   keeps=KEEPS, axes=AXES, vocabulary: str | None = None) -> list[Candidate]:
    """Every candidate costed on the target, the layers ranked by `ranking` (most important first)."""
    runtime = target_runtime(profile)
    shapes: list[tuple[float, str, Any]] = [(1.0, "-", None)]
    for keep in (k for k in keeps if k < 1):
        for axis in axes:
            try:
                plan, _ = ranked_shape(model_spec, ranking, Budget(params=keep), axis)
            except ShrinkError:  # a non-uniform model, or no shape of this size on this axis
                continue
            if all(p is None or p.spec != plan.spec for _, _, p in shapes):
                shapes.append((keep, axis, plan))
    candidates = []
    for keep, axis, plan in shapes:
        for kv, spec in kv_variants(model_spec if plan is None else plan.spec, runtime, budget):
            for family in runtime_families(runtime):
                candidates.append(cost(Candidate(keep, axis, family, runtime, plan, kv=kv), spec, profile, workload,
                                       budget, vocabulary))
    return candidates


def kv_variants(spec: Any, runtime: str, budget: TargetBudget) -> list[tuple[str | None, Any]]:
    """The spec as it is, and (on ONNX targets, with a TTFT or memory line in the budget) as each K/V
    transform its family supports would leave it: every pair of neighbouring same-kind layers sharing a
    cache, and SingleInputKV from half the layers on, the steps' defaults."""
    variants: list[tuple[str | None, Any]] = [(None, spec)]
    if runtime != "onnx" or (budget.ttft_s is None and budget.memory_bytes is None):
        return variants
    pairs = kvshare.every_pair(spec) if spec.family in kvshare.SUPPORTED_FAMILIES else []
    if pairs:
        variants.append(("kv-share", kvshare.shared_spec(spec, pairs)))
    if spec.family in swiftkv.SUPPORTED_FAMILIES and spec.num_layers > 1 and spec.single_input_kv is None:
        variants.append(("single-input-kv", swiftkv.single_input_spec(spec)))
    return variants


# Before anything is loaded, the plan checks the budget with the layers ranked by index (importance needs
# the weights): the sizes, and so the estimates, are the same; only which layers a depth cut keeps can
# change the attention windows it reads. A budget is refused early only when even the fastest candidate
# misses it by more than this factor, far beyond what the choice of layers can change.
EARLY_MARGIN = 1.10


def hopeless(spec: Any, profile: Any, workload: Any, budget: TargetBudget) -> tuple[str, list[Candidate]] | None:
    """(the no-plan message, the closest candidates) when no candidate can meet the budget, from the
    config alone, in about a second; None when one may (the full plan then decides)."""
    relaxed = TargetBudget(*(None if v is None else v * EARLY_MARGIN
                             for v in (budget.tpot_s, budget.ttft_s, budget.memory_bytes)))
    # llama.cpp's quantizer may also put the vocabulary on its narrowest type (flows/gguf_search.py)
    vocabulary = narrowest_vocabulary(spec.hidden_size) if target_runtime(profile) == "gguf" else None
    candidates = candidates_for(spec, list(range(spec.num_layers)), profile, workload, relaxed, vocabulary=vocabulary)
    if any(c.fits for c in candidates):
        return None
    return no_plan_message(candidates, budget, profile), closest(candidates, budget)


# --- the quality proxy ---

PROXY_SEQUENCES = 8  # held-out sequences the proxy's KL is measured on (a slice: it ranks, it does not report)


def measure_proxies(candidates: list[Candidate], loaded_source: str, importance: Any, split: Any,
                    proxy_steps: int, calibration: str, status: Callable[[str], None] = lambda m: None) -> None:
    """Measure KL(teacher || candidate part) on a held-out slice, once per shape (after `proxy_steps` of
    recovery), once per format (PTQ with `calibration`, as the quantize step calibrates) and once per K/V
    transform, for the candidates within budget: only those are ranked."""
    from shrink.compress.distill.evaluate import evaluate  # imports torch

    live = [c for c in candidates if c.fits and c.quantizer is None]  # a quantizer option is measured
    split = replace(split, evaluation=split.evaluation[:PROXY_SEQUENCES])
    teacher = load(loaded_source)
    eval_topk = teacher_topk(teacher.model, split.evaluation)
    train_topk = teacher_topk(teacher.model, split.train) if proxy_steps else None
    shapes = {}
    for c in live:
        if c.shape is not None:
            shapes.setdefault(id(c.shape), c)
    shape_kl: dict[int, float] = {}
    with tempfile.TemporaryDirectory(prefix="shrink-plan-") as workdir:
        for n, (key, c) in enumerate(shapes.items(), 1):
            status(f"Quality proxy: shape {n}/{len(shapes)} ({c.shape.label})")
            # a Puzzle architecture is assembled from its trained variants, a prune shape cut from the teacher
            built = c.shape.build(teacher, importance) if c.axis == "puzzle" else apply(c.shape, teacher, importance)
            if proxy_steps:
                shape_kl[key] = recovered_kl(built.model, split, train_topk, eval_topk, proxy_steps, 4,
                                             Path(workdir) / str(n))[1]
            else:
                shape_kl[key] = evaluate(built.model, split.evaluation, *eval_topk).kl
            del built
    format_kl: dict[str | None, float] = {None: 0.0}
    kv_kl = measure_kv_transforms({c.kv for c in live if c.kv}, teacher, split, eval_topk, status)
    for n, family in enumerate(sorted({c.format for c in live if c.format}), 1):
        status(f"Quality proxy: format {family} (PTQ, {calibration} calibration)")
        student = load(loaded_source)
        plan = make_plan(student.model, family, live[0].runtime)
        calibrate(student.model, plan, calibration, split.calibration, student.spec.family)
        materialize(fake_quantize(student.model, plan), plan)  # plain Linears on the grid: a faster forward
        format_kl[family] = evaluate(student.model, split.evaluation, *eval_topk).kl
        del student
    for c in live:
        c.kl_shape = 0.0 if c.shape is None else shape_kl[id(c.shape)]
        c.kl_format = format_kl[c.format]
        c.kl_kv = kv_kl.get(c.kv, 0.0)


def measure_kv_transforms(kinds: set[str], teacher: Any, split: Any, eval_topk: Any,
                          status: Callable[[str], None] = lambda m: None) -> dict[str, float]:
    """KL of the unpruned model right after each K/V transform, made as its recipe step makes it (sharing:
    pairs chosen by key/value similarity on the calibration text; SingleInputKV from half the layers),
    before any recovery: the transform's part of a candidate's predicted KL."""
    from shrink.compress.distill.evaluate import evaluate  # imports torch

    measured = {}
    for kind in sorted(kinds):
        status(f"Quality proxy: {KV_TRANSFORMS[kind]} (before recovery)")
        if kind == "kv-share":
            pairs = kvshare.choose_pairs(teacher.spec, kvshare.key_value_similarity(teacher, split.calibration))
            transformed = kvshare.share_kv(teacher, pairs)
        else:
            transformed = swiftkv.single_input_kv(teacher, swiftkv.default_k(teacher.spec))
        measured[kind] = evaluate(transformed.model, split.evaluation, *eval_topk).kl
    return measured


def choose(candidates: list[Candidate]) -> Candidate:
    """The fitting candidate with the lowest predicted KL (the faster one on a tie)."""
    fitting = [c for c in candidates if c.fits and c.predicted_kl is not None]
    return min(fitting, key=lambda c: (round(c.predicted_kl, 6), c.tpot_s))


def no_plan_message(candidates: list[Candidate], budget: TargetBudget, profile: Any) -> str:
    """One sentence: what the best candidate reaches and how much smaller a model the budget needs."""
    costed = [c for c in candidates if c.rejected is None] or candidates
    parts = []
    if budget.tpot_s is not None:
        best = min(costed, key=lambda c: c.tpot_s)
        if best.tpot_s > budget.tpot_s:
            parts.append(f"the fastest candidate ({best.label}) reaches {fmt_time(best.tpot_s)} per token on "
                         f"{profile.name} (estimated); {fmt_time(budget.tpot_s)} needs a model "
                         f"{_less(budget.tpot_s, best.tpot_s)} in bytes read per token than it")
    if budget.ttft_s is not None:
        best = min(costed, key=lambda c: c.ttft_s)
        if best.ttft_s > budget.ttft_s:
            parts.append(f"the quickest first token ({best.label}) takes {fmt_time(best.ttft_s)} (estimated); "
                         f"{fmt_time(budget.ttft_s)} needs prefill work {_less(budget.ttft_s, best.ttft_s)}")
    if budget.memory_bytes is not None:
        best = min(costed, key=lambda c: c.memory_bytes)
        if best.memory_bytes > budget.memory_bytes:
            parts.append(f"the smallest candidate ({best.label}) needs {fmt_bytes(best.memory_bytes)} (estimated); "
                         f"{fmt_bytes(budget.memory_bytes)} needs a model {_less(budget.memory_bytes, best.memory_bytes)}")
    if not parts:
        parts.append("each candidate misses one line of the budget or another, none meets all of them together")
    return "No plan meets the budget: " + "; ".join(parts) + "."


def _less(wanted: float, reached: float) -> str:
    """'about 23% smaller', or 'about 258 times smaller' where a percentage would round to 100%."""
    share = 1 - wanted / reached
    return f"about {share:.0%} smaller" if share < 0.95 else f"about {reached / wanted:,.0f} times smaller"


def closest(candidates: list[Candidate], budget: TargetBudget, count: int = 5) -> list[Candidate]:
    """The candidates nearest to the budget (by their worst ratio to a budget line)."""
    def excess(c: Candidate) -> float:
        ratios = [c.tpot_s / budget.tpot_s if budget.tpot_s else 0, c.ttft_s / budget.ttft_s if budget.ttft_s else 0,
                  c.memory_bytes / budget.memory_bytes if budget.memory_bytes else 0]
        return max(ratios)
    return sorted((c for c in candidates if c.rejected is None), key=excess)[:count]
