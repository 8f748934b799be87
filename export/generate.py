"""Greedy text generation inside an artifact's own runtime, with the artifact's own tokenizer: the
plainest proof that what was exported is a working model."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shrink.errors import ShrinkError
from shrink.export.runtimes import artifact_kind


@dataclass
class Generation:
    runtime: str
    prompt: str
    text: str
    new_tokens: int
    seconds: float  # measured wall time of the whole generation, prompt included


def generate(artifact: str | Path, prompt: str, max_tokens: int = 32, threads: int | None = None) -> Generation:
    artifact = Path(artifact)
    if max_tokens < 1:
        raise ShrinkError(f"--max-tokens must be at least 1, got {max_tokens}.")
    kind = artifact_kind(artifact)
    return _gguf(artifact, prompt, max_tokens, threads) if kind == "gguf" else _onnx(artifact, prompt, max_tokens, threads)


def _gguf(path: Path, prompt: str, max_tokens: int, threads: int | None) -> Generation:
    from shrink.export.runtimes import LlamaCppRunner

    runner = LlamaCppRunner(path, 512, threads)
    llm = runner.llm
    # Checked from the metadata: llama.cpp aborts the process when asked to tokenize without a vocabulary.
    if llm.metadata.get("tokenizer.ggml.model", "none") in ("none", "no_vocab"):
        raise ShrinkError(f"'{path}' carries no tokenizer, so it cannot generate text (verify and bench still work).")
    start = time.perf_counter()
    out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
    seconds = time.perf_counter() - start
    return Generation("llama.cpp", prompt, out["choices"][0]["text"], out["usage"]["completion_tokens"], seconds)


def _onnx(directory: Path, prompt: str, max_tokens: int, threads: int | None) -> Generation:
    from transformers import AutoTokenizer

    from shrink.export.onnx_runtime import OnnxRunner

    if not (directory / "tokenizer_config.json").is_file():
        raise ShrinkError(f"'{directory}' carries no tokenizer, so it cannot generate text (verify and bench still work).")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    runner = OnnxRunner(directory, threads)
    ids = tokenizer(prompt).input_ids
    start = time.perf_counter()
    logits, cache = runner.step(ids, runner.empty_cache())
    new: list[int] = []
    for _ in range(max_tokens):
        token = int(np.argmax(logits[-1]))
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        logits, cache = runner.step([token], cache)
    seconds = time.perf_counter() - start
    return Generation("onnxruntime", prompt, tokenizer.decode(new), len(new), seconds)
