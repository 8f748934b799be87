"""The single-input-kv step: SwiftKV's SingleInputKV on the model (compress/swiftkv.py), then its first
training stage (the new norm and the queries, keys and values of the layers from k on, everything else
frozen) distilled against the teacher's cached logits; reports the estimated time to first token at a
long prompt before and after, and the held-out KL right after the transform and after the stage.
A following distill step is SwiftKV's optional second stage (every parameter)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shrink.compress.swiftkv import default_k, freeze_for_stage_one, single_input_kv, unfreeze
from shrink.flows import defaults
from shrink.flows.steps import Hooks, distill, distill_config, evaluate_against
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate

LONG_PROMPT = Workload(prompt_len=defaults.LONG_PROMPT_LEN)
# Stage one keeps the trainer's temperature 1. SwiftKV distils at 2 over the full vocabulary; over our cached
# top-k a temperature other than 1 renormalises within the k tokens, and on a tiny Qwen3 (k = 2 of 4, 20
# steps, lr 1e-3) it raised the held-out KL from 0.063 to 0.077 where temperature 1 lowered it to 0.011.


def single_input(loaded: Any, teacher: Any, split: Any, hooks: Hooks, topk: tuple[Any, Any], checkpoints: Path, *,
                 k: int | None = None, tokens: int = defaults.DISTILL_TOKENS, lr: float = defaults.DISTILL_LR,
                 queries: bool = True, seq_len: int = defaults.SEQ_LEN, batch_size: int = defaults.BATCH_SIZE,
                 target: str = "host") -> tuple[Any, dict]:
    """The SingleInputKV model after its first stage (none when `tokens` is 0) and its report; `k`
    None: half the layers, as SwiftKV's Llama-3.1-8B (16 of 32). `topk` is the teacher's cached
    (train, evaluation) top-k logits."""
    k = default_k(loaded.spec) if k is None else k
    swift = single_input_kv(loaded, k)
    profile = get_profile(target)
    before, after = (estimate(spec, profile, LONG_PROMPT).ttft_s for spec in (loaded.spec, swift.spec))
    report: dict = {"k": k, "queries_trained": queries,
                    "ttft_s_estimated": {"before": before, "after": after, "target": profile.name,
                                         "prompt_len": LONG_PROMPT.prompt_len},
                    "held_out_after_transform": evaluate_against(swift.model, split, topk[1])}
    if tokens:
        report["trained_params"] = freeze_for_stage_one(swift.model, queries)
        config = distill_config(tokens, seq_len, lr=lr, batch_size=batch_size)
        try:
            result = distill(swift, teacher, split, config, checkpoints, hooks, topk=topk)
        finally:
            unfreeze(swift.model)
        report["stage_one"] = {key: getattr(result, key) for key in ("steps", "tokens", "eval_before", "eval_after")}
    return swift, report
