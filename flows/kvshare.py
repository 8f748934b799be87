"""The kv-share step: choose which layers share a KV cache (or take the groups given), share them, and
report what the cache costs before and after (estimated) and what sharing cost in quality (measured).
What a recipe's `kv-share` step runs; recovery is the distill step after it."""

from __future__ import annotations

from typing import Any

from shrink.compress.kvshare import choose_pairs, key_value_similarity, share_kv
from shrink.errors import ShrinkError
from shrink.flows import defaults
from shrink.flows.steps import Hooks
from shrink.hardware.profiles import get_profile
from shrink.hardware.roofline import Workload, estimate

LONG_PROMPT = Workload(prompt_len=defaults.LONG_PROMPT_LEN)


def parse_groups(text: str) -> list[list[int]]:
    """'0-1,2-3' or '0-1-2' -> [[0, 1], [2, 3]] / [[0, 1, 2]]."""
    try:
        return [[int(i) for i in part.split("-")] for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise ShrinkError(f"KV-sharing groups are written like 0-1,2-3 (layers joined by '-', groups by ','); "
                          f"got '{text}'.") from None


def share(loaded: Any, calibration: Any, hooks: Hooks, *, groups: str = "", pairs: int | None = None,
          init: str = "mean", target: str = "host") -> tuple[Any, dict]:
    """The shared model and its report; `groups` given, or `pairs` chosen by key/value similarity
    (None: every pair of consecutive same-kind layers that fits)."""
    if groups:
        chosen, similarity = parse_groups(groups), {}
    else:
        hooks.status(f"Measuring key/value similarity of neighbouring layers on {calibration.numel():,} tokens")
        similarity = key_value_similarity(loaded, calibration)
        chosen = choose_pairs(loaded.spec, similarity, pairs)
    shared = share_kv(loaded, chosen, init=init)
    profile = get_profile(target)
    before, after = (estimate(spec, profile, LONG_PROMPT).memory.kv_cache_bytes for spec in (loaded.spec, shared.spec))
    report = {"groups": chosen, "init": init,
              "similarity": {f"{a}-{b}": value for (a, b), value in similarity.items()},
              "kv_cache_bytes_estimated": {"before": before, "after": after, "prompt_len": LONG_PROMPT.prompt_len,
                                           "gen_len": LONG_PROMPT.gen_len}}
    return shared, report
