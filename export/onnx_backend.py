"""The ONNX artifact kind: a directory holding model.onnx, written by export/onnx.py and run in ONNX Runtime."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from shrink.archspec import ArchSpec, Formats
from shrink.errors import ShrinkError
from shrink.export.costing import fallback_ops, onnx_vocabulary, planned_weights
from shrink.export.onnx import export_onnx, onnx_format, onnx_formats
from shrink.export.onnx_runtime import OnnxRunner
from shrink.export.runtimes import Runner, as_if_from_disk, timed_runs


class OnnxBackend:
    kind = "onnx"
    runtime = "onnxruntime"
    default_quant = "f32"  # ONNX Runtime's CPU kernels compute in float32; int8/int4 (MatMulNBits) and fp8 on request
    default_block_size = 32  # weights per MatMulNBits block: the block GGUF's Q8_0/Q4_0 use too

    def matches(self, path: Path) -> bool:
        return path.is_dir() and (path / "model.onnx").is_file()

    def artifact_in(self, folder: Path) -> Path:
        """Where a run step writes its artifact inside the step's folder."""
        return folder / "onnx"

    def export(self, loaded: Any, output: Path, quant: str | None = None, *, pad_to_uniform: bool = False,
               block_size: int | None = None, logits: str | None = None) -> dict:
        return export_onnx(loaded, output, quant or self.default_quant, block_size or self.default_block_size,
                           logits).to_dict()

    def check_quant(self, quant: str | None, block_size: int | None = None) -> None:
        onnx_format(quant or self.default_quant, block_size or self.default_block_size)

    def open_runner(self, path: Path, max_tokens: int, threads: int | None = None) -> Runner:
        return OnnxRunner(path, threads)

    def time(self, path: Path, threads: int, prompt: list[int], gen: list[int],
             repeats: int) -> tuple[list[float], list[float]]:
        as_if_from_disk(path)
        runner = OnnxRunner(path, threads)

        def prefill() -> dict:
            return runner.step(prompt, runner.empty_cache())[1]

        return timed_runs(prefill, lambda cache, token: runner.step([token], cache)[1], gen, repeats)

    def generate(self, path: Path, prompt: str, max_tokens: int, threads: int | None) -> tuple[str, int, float]:
        """Greedy continuation: (text, new tokens, seconds measured)."""
        tokenizer = _artifact_tokenizer(path)
        if tokenizer is None:
            raise ShrinkError(f"'{path}' carries no tokenizer, so it cannot generate text (verify and bench still work).")
        runner = OnnxRunner(path, threads)
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
        return tokenizer.decode(new), len(new), time.perf_counter() - start

    @contextlib.contextmanager
    def tokenizer(self, path: Path) -> Iterator[Callable[[str], list[int]] | None]:
        """text -> ids with the tokenizer files the directory carries (None when it carries none)."""
        tokenizer = _artifact_tokenizer(path)
        yield None if tokenizer is None else (lambda text: tokenizer(text).input_ids)

    def stored_formats(self, path: Path, spec: ArchSpec) -> tuple[ArchSpec, Formats]:
        """The formats the graph stores (MatMulNBits scales included), whether its lm_head and token
        embedding share one table (the spec says untied when the file stores two) and which prompt
        positions its prefill projects onto the vocabulary."""
        read = onnx_formats(path)
        return replace(spec, tied_embeddings=spec.tied_embeddings and read.tied, prompt_logits=read.prompt_logits), read.formats

    def costed_spec(self, spec: ArchSpec, family: str | None, lm_head_kept: bool = True) -> ArchSpec:
        """What export/onnx.py writes for `family`: the block weights in its ONNX layout (MatMulNBits or
        FP8 + DequantizeLinear); the token embedding and lm_head in costing.onnx_vocabulary's format, f32
        when a student's plan keeps them (lm_head_kept: every planned run), else the blocks' layout
        (`shrink export --quant`), a tied table stored once either way; activations and KV f32."""
        weights = planned_weights(family, self.kind)
        vocabulary = onnx_vocabulary(weights, spec.hidden_size, kept=lm_head_kept or not weights.quantized).name
        formats = Formats(weights=weights.name, embeddings=vocabulary, activations="fp32", kv_cache="fp32", other="fp32",
                          lm_head=None if spec.tied_embeddings else vocabulary, ops=fallback_ops(spec, weights))
        return replace(spec, formats=formats.validated())

    def stored_quant(self, path: Path) -> str:
        """The registry format the graph stores its block weights in, read from the graph itself."""
        return onnx_formats(path).formats.weights


def _artifact_tokenizer(path: Path) -> Any | None:
    """The tokenizer files an ONNX directory carries, loaded (None when it carries none)."""
    if not (path / "tokenizer_config.json").is_file():
        return None
    from transformers import AutoTokenizer  # heavy: only generation and verify need the artifact's tokenizer

    return AutoTokenizer.from_pretrained(path)
