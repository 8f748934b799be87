"""Bench: measured prefill and decode of an artifact in its runtime here, beside the roofline
estimate for the `host` profile. Token identities do not change the work, so the prompt and the
fed tokens are fixed seeded ids (no sampling cost is timed)."""

from __future__ import annotations

import os
import random
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shrink.errors import ShrinkError
from shrink.export.backend import artifact_costing, backend_for
from shrink.hardware.profiles import Profile, get_profile
from shrink.hardware.roofline import Workload, estimate


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    q1_s: float
    q3_s: float
    samples: int


def _timing(samples: list[float]) -> Timing:
    q1, _, q3 = statistics.quantiles(samples, n=4) if len(samples) > 1 else (samples[0],) * 3
    return Timing(statistics.median(samples), min(samples), max(samples), q1, q3, len(samples))


@dataclass
class BenchResult:
    artifact: str
    runtime: str
    threads: int
    prompt_len: int
    gen_len: int
    repeats: int
    prefill: Timing  # one prompt, measured
    decode: Timing  # one token, measured
    estimate: Any  # roofline Estimate for host, or None

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_len / self.prefill.median_s

    def to_dict(self) -> dict:
        data = asdict(self)
        data["estimate"] = self.estimate.to_dict() if self.estimate else None
        data["measured"] = {"prefill_tokens_per_s": self.prefill_tokens_per_s,
                            "decode_s_per_token": self.decode.median_s,
                            "decode_tokens_per_s": 1 / self.decode.median_s}
        return data


def token_ids(count: int, vocab: int) -> list[int]:
    rng = random.Random(0)
    return [rng.randrange(1, vocab) for _ in range(count)]


def bench(artifact: str | Path, threads: int | None = None, *, prompt_len: int, gen_len: int,
          repeats: int, host: Profile | None = None) -> BenchResult:
    """Time the artifact in its runtime here (the lengths' defaults: flows/defaults.py), beside its
    estimate on `host` (default: the cached host profile) with the runtime's kernels where calibrated."""
    artifact = Path(artifact)
    kind = backend_for(artifact)
    Workload(batch=1, prompt_len=prompt_len, gen_len=gen_len)  # validates the numbers
    if repeats < 1:
        raise ShrinkError(f"--repeats must be at least 1, got {repeats}.")
    threads = threads or os.cpu_count() or 1
    spec, formats = artifact_costing(artifact)
    vocab = spec.vocab_size if spec else 256
    prompt, gen = token_ids(prompt_len, vocab), token_ids(gen_len, vocab)
    prefill, decode = kind.time(artifact, threads, prompt, gen, repeats)
    est = None
    if spec is not None:
        est = estimate(spec.with_formats(**formats), host or get_profile("host"), Workload(1, prompt_len, gen_len),
                       kind.runtime)
    return BenchResult(str(artifact), kind.runtime, threads, prompt_len, gen_len, repeats, _timing(prefill),
                       _timing(decode), est)
