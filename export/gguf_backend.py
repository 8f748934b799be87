"""The GGUF artifact kind: a single .gguf file, written by export/gguf.py and run in llama.cpp."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from shrink.archspec import ArchSpec, Formats
from shrink.errors import ShrinkError
from shrink.export.costing import fallback_ops, planned_weights
from shrink.export.gguf import export_gguf, quant_format
from shrink.export.runtimes import LlamaCppRunner, Runner, as_if_from_disk, open_llama, timed_runs
from shrink.ggufmeta import gguf_formats
from shrink.numformats import gguf_activations, vocabulary_format


class GGUFBackend:
    kind = "gguf"
    runtime = "llama.cpp"
    default_quant = "f16"  # half the bytes of f32 and exact for bf16/f16 checkpoints; llama.cpp runs it everywhere

    def matches(self, path: Path) -> bool:
        return path.is_file() and path.suffix == ".gguf"

    def artifact_in(self, folder: Path) -> Path:
        """Where a run step writes its artifact inside the step's folder."""
        return folder / "model.gguf"

    def export(self, loaded: Any, output: Path, quant: str | None = None, *, pad_to_uniform: bool = False,
               block_size: int | None = None, logits: str | None = None) -> dict:
        # `logits` shapes an ONNX graph; llama.cpp computes the logits its caller asks for (cli/export.py refuses it)
        return export_gguf(loaded, output, quant or self.default_quant, pad_to_uniform).to_dict()

    def check_quant(self, quant: str | None, block_size: int | None = None) -> None:
        quant_format(quant or self.default_quant)

    def open_runner(self, path: Path, max_tokens: int, threads: int | None = None) -> Runner:
        return LlamaCppRunner(path, max_tokens, threads)

    def time(self, path: Path, threads: int, prompt: list[int], gen: list[int],
             repeats: int) -> tuple[list[float], list[float]]:
        as_if_from_disk(path)
        llm = open_llama(path, n_ctx=len(prompt) + len(gen) + 8, n_batch=len(prompt), threads=threads)

        def prefill() -> None:
            llm.reset()
            llm.eval(prompt)

        return timed_runs(prefill, lambda _, token: llm.eval([token]), gen, repeats)

    def generate(self, path: Path, prompt: str, max_tokens: int, threads: int | None) -> tuple[str, int, float]:
        """Greedy continuation: (text, new tokens, seconds measured)."""
        llm = LlamaCppRunner(path, 512, threads).llm
        if not _has_vocabulary(llm):  # llama.cpp aborts the process when asked to tokenize without one
            raise ShrinkError(f"'{path}' carries no tokenizer, so it cannot generate text (verify and bench still work).")
        start = time.perf_counter()
        out = llm.create_completion(prompt, max_tokens=max_tokens, temperature=0.0, top_k=1)
        return out["choices"][0]["text"], out["usage"]["completion_tokens"], time.perf_counter() - start

    @contextlib.contextmanager
    def tokenizer(self, path: Path) -> Iterator[Callable[[str], list[int]] | None]:
        """text -> ids with the file's own vocabulary and BOS/EOS rules, special tokens parsed as Hugging
        Face parses them; None when the file carries no vocabulary."""
        llm = open_llama(path, n_ctx=64, n_batch=64, threads=1, vocab_only=True)
        try:
            yield (lambda text: llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)) if _has_vocabulary(llm) else None
        finally:
            llm.close()

    def stored_formats(self, path: Path, spec: ArchSpec) -> tuple[ArchSpec, Formats]:
        """The formats the file stores, read from its tensor types (for the roofline)."""
        return spec, gguf_formats(path).formats

    def costed_spec(self, spec: ArchSpec, family: str | None, lm_head_kept: bool = True) -> ArchSpec:
        """What export/gguf.py writes for `family`: block weights in its stored format (an operator whose
        rows its blocks do not divide in the registry's fallback), token embedding and output on at least
        8 bits (Q8_0 below that), norms f32; activations as llama.cpp's dot products take them
        (registry.gguf_activations); KV cache f16. lm_head_kept: no effect (always stored)."""
        weights = planned_weights(family, self.kind)
        formats = Formats(weights=weights.name, embeddings=vocabulary_format(weights, self.kind).name,
                          activations=gguf_activations(weights), kv_cache="fp16", other="fp32",
                          ops=fallback_ops(spec, weights))
        return replace(spec, formats=formats.validated())

    def stored_quant(self, path: Path) -> str:
        """The registry format the file stores its block weights in (the type holding most of their bytes)."""
        return gguf_formats(path).formats.weights


def _has_vocabulary(llm: Any) -> bool:
    """Whether the loaded GGUF carries a tokenizer (tiny test models carry llama.cpp's "none")."""
    return llm.metadata.get("tokenizer.ggml.model", "none") not in ("none", "no_vocab")
