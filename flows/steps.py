"""The steps, once: what `shrink prune`, `shrink distill` and `shrink quantize` do, and what a recipe's
steps do (flows/run.py executes those on the output of the step before, in a run directory).

A step function takes loaded models and typed settings, reports through `Hooks` and returns its
result; it never prints. The command renders the result, the recipe executor records it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, ContextManager

from shrink.compress.data import prepare
from shrink.compress.distill.parallel import check_parallel, check_precision, main_rank_first, world
from shrink.compress.distill.teacher import teacher_topk
from shrink.compress.importance import cached_score, layer_kl_scores
from shrink.compress.pruning import prune_to_budget, prune_to_sizes
from shrink.compress.quant.plan import grid_for
from shrink.compress.quant.run import QuantizeSettings, quantize_model
from shrink.compress.search import Budget
from shrink.errors import ShrinkError
from shrink.flows import defaults
from shrink.hardware.profiles import get_profile
from shrink.model import load, load_bitsandbytes
from shrink.vocabmap import kept_view, trim_of

Progress = Callable[[int, float, float], None]  # (step, loss, tokens per second) after each optimizer step


def _no_progress(label: str, total: int, visible: bool = True) -> ContextManager[Progress]:
    return contextlib.nullcontext(lambda step, loss, speed: None)


@dataclass
class Hooks:
    """How a flow talks to its caller: status lines, a distillation's progress, a run's step boundaries.
    `training(label, total_steps, visible)` is a context manager giving the per-step progress callback."""
    status: Callable[[str], None] = lambda message: None
    training: Callable[[str, int, bool], ContextManager[Progress]] = _no_progress
    step_started: Callable[[int, str], None] = lambda index, name: None
    step_finished: Callable[[int, dict], None] = lambda index, record: None


# --- shared pieces ---

def load_model(source: str, hooks: Hooks, mode: str | None = None, role: str = "", weights: bool = True) -> Any:
    """A LoadedModel; `mode` 8bit or nf4 loads it through bitsandbytes (teachers larger than memory);
    `weights=False` its structure only, on the meta device (model.load)."""
    hooks.status(f"Loading {role}{source}")
    return load(source, weights=weights) if mode is None else load_bitsandbytes(source, mode)


def prepare_split(loaded: Any, data: str | None, seq_len: int, hooks: Hooks, current: Any = None,
                  student: Any = None) -> Any:
    """Calibration, training and held-out text; under torchrun rank 0 writes the cache first. Given a
    `student` with a trimmed vocabulary, the text is tokenized with its tokenizer (vocabmap.py)."""
    hooks.status("Preparing the calibration, training and held-out text")
    tokenizer = student.tokenizer if student is not None and trim_of(student.model) is not None else None
    with main_rank_first(current or world()):
        return prepare(loaded, data, seq_len=seq_len, tokenizer=tokenizer)


def train(hooks: Hooks, model: Any, split: Any, train_topk: Any, eval_topk: Any, config: Any, checkpoints: Path,
          teacher: Any = None, current: Any = None, label: str = "distilling") -> Any:
    """The shared trainer on `model` (a torch module) with the caller's progress display; the
    signature compress/quant/run.py's `train=` expects, after `hooks`."""
    from shrink.compress.distill.trainer import distill  # imports torch

    current = current or world()
    with hooks.training(label, config.steps, current.is_main) as progress:
        return distill(model, split.train, train_topk, config, checkpoints, split.evaluation, eval_topk,
                       progress=progress, teacher=teacher, current=current)


def trainer(hooks: Hooks) -> Callable[..., Any]:
    return lambda *args, **kwargs: train(hooks, *args, **kwargs)


def evaluate_against(model: Any, split: Any, eval_topk: Any) -> dict:
    from shrink.compress.distill.evaluate import evaluate  # imports torch

    return evaluate(model, split.evaluation, *eval_topk).to_dict()


# --- prune ---

@dataclass
class Pruned:
    model: Any  # the pruned LoadedModel
    report: dict  # the budget search's report; empty when sizes were given
    importance: Any


def check_depth_criterion(name: str) -> None:
    if name not in ("bi", "kl"):
        raise ShrinkError(f"--depth-criterion must be bi or kl, not '{name}'.")


def prune_budget(params: float | None = None, memory_bytes: float | None = None, latency_s: float | None = None,
                 target: str | None = None) -> Budget:
    if target is not None and latency_s is None:
        raise ShrinkError("--target is the hardware a latency --budget is estimated on; give --budget too.")
    return Budget(params=params, memory_bytes=memory_bytes, latency_s=latency_s,
                  profile=get_profile(target) if target else None)


def prune(loaded: Any, split: Any, hooks: Hooks, *, sizes: dict | None = None, budget: Budget | None = None,
          axis: str = defaults.PRUNE_AXIS, search: bool = False, candidates: int = defaults.SEARCH_CANDIDATES,
          proxy_steps: int = defaults.SEARCH_PROXY_STEPS, weights: str | None = None,
          depth_criterion: str = defaults.DEPTH_CRITERION) -> Pruned:
    """Score importance on the calibration text and prune to `sizes` (ffn, heads, kv_groups, hidden,
    layers, ssm_heads, ssm_head_dim) or to a `budget` (by the fixed rule, or by `search`)."""
    sizes = {k: v for k, v in (sizes or {}).items() if v is not None}
    if (budget is None) == (not sizes):
        raise ShrinkError("Prune to sizes (ffn, heads, kv_groups, hidden, layers, ssm_heads, ssm_head_dim) or to a "
                          "budget (params, memory, latency): one of the two, not both.")
    check_depth_criterion(depth_criterion)
    hooks.status(f"Scoring importance on {split.calibration.numel():,} calibration tokens")
    current = world()  # under torchrun the scoring passes are split over the processes
    importance = cached_score(loaded, split.calibration, current=current)
    if depth_criterion == "kl" and ("layers" in sizes or axis != "width"):
        importance = replace(importance, layers=layer_kl_scores(loaded, split.calibration, current=current))
    if budget is None:
        return Pruned(prune_to_sizes(loaded, importance, **sizes), {}, importance)
    hooks.status("Choosing the shape")
    pruned, report = prune_to_budget(loaded, importance, split, budget, axis, search, candidates, proxy_steps,
                                     weights, status=hooks.status)
    return Pruned(pruned, report, importance)


# --- distill ---

def distill_config(tokens: int = defaults.DISTILL_TOKENS, seq_len: int = defaults.SEQ_LEN, **settings: Any) -> Any:
    """A DistillConfig whose steps cover `tokens` (unless `steps` is given), checkpointed
    defaults.CHECKPOINTS_PER_RUN times (unless `checkpoint_every` is given)."""
    from shrink.compress.distill.trainer import DistillConfig  # imports torch

    batch_size = settings.setdefault("batch_size", defaults.BATCH_SIZE)
    settings.setdefault("lr", defaults.DISTILL_LR)
    settings.setdefault("loss", defaults.DISTILL_LOSS)
    if settings.get("steps") is None:
        settings["steps"] = defaults.distill_steps(tokens, batch_size, seq_len)
    if settings.get("checkpoint_every") is None:
        settings["checkpoint_every"] = defaults.checkpoint_every(settings["steps"])
    config = DistillConfig(**settings)
    config.check()
    return config


def _teacher_for(student: Any, teacher: Any) -> Any:
    if teacher.spec.vocab_size != student.spec.vocab_size:
        trim = trim_of(student.model)
        if trim is None or trim.original_size != teacher.spec.vocab_size:
            raise ShrinkError("Teacher and student have different vocabularies; logit distillation needs the same one.")
        # the teacher over the kept tokens (its spec says so, so that a second call leaves it as it is)
        teacher = replace(teacher, model=kept_view(teacher.model, trim) if teacher.model is not None else None,
                          spec=replace(teacher.spec, vocab_size=trim.size))
    return teacher


def teacher_logits(student: Any, teacher: Any, split: Any, config: Any, hooks: Hooks, current: Any = None) -> Any:
    """The teacher's cached top-k (train, evaluation) for distilling `student`: a parallel pass under
    torchrun, written once, by rank 0."""
    teacher = _teacher_for(student, teacher)
    current = current or world()  # under torchrun each process computes a share; rank 0 writes the cache
    hooks.status("Caching the teacher's top-k logits")
    return (teacher_topk(teacher.model, split.train, config.top_k, current=current),
            teacher_topk(teacher.model, split.evaluation, config.top_k, current=current))


def distill(student: Any, teacher: Any, split: Any, config: Any, checkpoints: Path, hooks: Hooks,
            current: Any = None, topk: tuple[Any, Any] | None = None) -> Any:
    """Distill `student` (a LoadedModel, changed in place) towards `teacher` on its cached top-k
    logits; resumes from `checkpoints`. `topk` (train, evaluation) reuses logits already cached; with
    it, `teacher` may be a LoadedModel without weights (model None) unless the hidden-state term is on."""
    current = current or world()
    teacher = _teacher_for(student, teacher)
    if topk is None:
        topk = teacher_logits(student, teacher, split, config, hooks, current)
    return train(hooks, student.model, split, *topk, config, checkpoints,
                 teacher=teacher.model if config.hidden_weight else None, current=current)


# --- quantize ---

def quantize(student: Any, teacher: Any, split: Any, settings: QuantizeSettings, checkpoints: Path,
             hooks: Hooks) -> dict:
    """PTQ, then QAD when settings.qad: `student` (a LoadedModel) is left holding its on-grid weights."""
    return quantize_model(student, teacher, split, settings, checkpoints, train=trainer(hooks), status=hooks.status)


def quantize_settings(format: str, **settings: Any) -> QuantizeSettings:
    """QuantizeSettings with the flows' defaults for whatever is not given; an unknown format or
    runtime fails here, before any model is loaded."""
    for name, value in (("runtime", defaults.QUANT_RUNTIME), ("calibration", defaults.CALIBRATION),
                        ("tokens", defaults.QAD_TOKENS), ("batch_size", defaults.BATCH_SIZE)):
        if settings.get(name) is None:
            settings[name] = value
    grid_for(format, settings["runtime"])
    check_parallel(settings.get("parallel", "auto"))
    check_precision(settings.get("precision", "fp32"))
    return QuantizeSettings(format=format, **settings)
