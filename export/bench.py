"""Bench: measured prefill and decode of an artifact in its runtime here, beside the roofline
estimate for the `host` profile. Token identities do not change the work, so the prompt and the
fed tokens are fixed seeded ids (no sampling cost is timed)."""

from __future__ import annotations

import os
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from shrink.archspec import ArchSpec
from shrink.errors import ShrinkError
from shrink.export.manifest import manifest_path, read_manifest
from shrink.export.runtimes import artifact_kind


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


def time_gguf(path: Path, threads: int, prompt: list[int], gen: list[int], repeats: int) -> tuple[list[float], list[float]]:
    from shrink.export.runtimes import open_llama

    llm = open_llama(path, n_ctx=len(prompt) + len(gen) + 8, n_batch=len(prompt), threads=threads)
    prefill, decode = [], []
    for run in range(repeats + 1):  # run 0 is a warm-up (page-in, kernel selection) and is dropped
        llm.reset()
        start = time.perf_counter()
        llm.eval(prompt)
        elapsed = time.perf_counter() - start
        steps = []
        for token in gen:
            start = time.perf_counter()
            llm.eval([token])
            steps.append(time.perf_counter() - start)
        if run:
            prefill.append(elapsed)
            decode += steps
    return prefill, decode


def time_onnx(path: Path, threads: int, prompt: list[int], gen: list[int], repeats: int) -> tuple[list[float], list[float]]:
    from shrink.export.onnx_runtime import OnnxRunner

    runner = OnnxRunner(path, threads)
    prefill, decode = [], []
    for run in range(repeats + 1):
        start = time.perf_counter()
        _, cache = runner.step(prompt, runner.empty_cache())
        elapsed = time.perf_counter() - start
        steps = []
        for token in gen:
            start = time.perf_counter()
            _, cache = runner.step([token], cache)
            steps.append(time.perf_counter() - start)
        if run:
            prefill.append(elapsed)
            decode += steps
    return prefill, decode


def artifact_costing(artifact: Path, kind: str) -> tuple[ArchSpec | None, dict]:
    own = manifest_path(artifact)
    manifest = read_manifest(own) if own.is_file() else None
    if manifest is None:
        return None, {}
    spec = ArchSpec.from_dict(manifest["archspec"])
    quant = manifest.get("export", {}).get("quant", "f32")
    if kind == "gguf":
        from shrink.ggufmeta import gguf_formats

        stored = gguf_formats(artifact).formats
        return spec, {k: getattr(stored, k) for k in ("weights", "embeddings", "activations", "kv_cache", "other")}
    weights = {"f32": "fp32", "int8": "int8", "int4": "int4_g32"}[quant]
    # A quantized ONNX export reads lm_head as a quantized MatMulNBits copy (tied tables are untied
    # for it), so per-token traffic follows the weight format; the f32 gather table is read a row at a time.
    return spec, {"weights": weights, "embeddings": weights, "activations": "fp32", "kv_cache": "fp32", "other": "fp32"}


def bench(artifact: str | Path, threads: int | None = None, prompt_len: int = 128, gen_len: int = 32,
          repeats: int = 3) -> BenchResult:
    from shrink.hardware.profiles import get_profile
    from shrink.hardware.roofline import Workload, estimate

    artifact = Path(artifact)
    kind = artifact_kind(artifact)
    Workload(batch=1, prompt_len=prompt_len, gen_len=gen_len)  # validates the numbers
    if repeats < 1:
        raise ShrinkError(f"--repeats must be at least 1, got {repeats}.")
    threads = threads or os.cpu_count() or 1
    spec, formats = artifact_costing(artifact, kind)
    vocab = spec.vocab_size if spec else 256
    prompt, gen = token_ids(prompt_len, vocab), token_ids(gen_len, vocab)
    runner = time_gguf if kind == "gguf" else time_onnx
    prefill, decode = runner(artifact, threads, prompt, gen, repeats)
    est = None
    if spec is not None:
        est = estimate(spec.with_formats(**formats), get_profile("host"), Workload(1, prompt_len, gen_len))
    return BenchResult(str(artifact), "llama.cpp" if kind == "gguf" else "onnxruntime", threads, prompt_len, gen_len,
                       repeats, _timing(prefill), _timing(decode), est)
