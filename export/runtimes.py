"""Runtimes that execute an artifact, behind one call: logits for every position of a token sequence.

The reference runs in PyTorch; a GGUF runs in llama.cpp (llama-cpp-python, here) and an ONNX directory
in ONNX Runtime (onnx_runtime.py). Every runner is teacher-forced: it is given the whole sequence, never
samples. Which runner an artifact gets is its backend's choice (export/backend.py).
"""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from shrink.errors import ShrinkError


class Runner(Protocol):
    name: str

    def logits(self, ids: list[int]) -> np.ndarray:  # (len(ids), vocab) float32
        ...


class TorchRunner:
    name = "pytorch"

    def __init__(self, model: Any) -> None:
        self.model = model.eval()

    def logits(self, ids: list[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            return self.model(torch.tensor([ids])).logits[0].float().numpy()


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path: Path, max_tokens: int, threads: int | None = None) -> None:
        self.llm = open_llama(path, n_ctx=max_tokens, n_batch=max_tokens, threads=threads, logits_all=True)

    def logits(self, ids: list[int]) -> np.ndarray:
        self.llm.reset()
        self.llm.eval(ids)
        return np.array(self.llm.scores[: len(ids)], dtype=np.float32)


def open_llama(path: Path, *, n_ctx: int, n_batch: int, threads: int | None = None, logits_all: bool = False,
               vocab_only: bool = False) -> Any:
    """A llama-cpp-python model (or only its vocabulary), its loader log kept off the terminal, a bad
    file one sentence."""
    from llama_cpp import Llama

    threads = threads or os.cpu_count() or 1
    try:
        with quiet_stderr(), extra_buffers_off_on_amx():
            return Llama(model_path=str(path), logits_all=logits_all, n_ctx=n_ctx, n_batch=n_batch, n_ubatch=n_batch,
                         n_threads=threads, n_threads_batch=threads, vocab_only=vocab_only, verbose=False)
    except (ValueError, RuntimeError) as err:
        raise ShrinkError(f"llama.cpp could not load '{path}': the file is corrupt, truncated or of an unsupported kind ({err}).") from None


@contextlib.contextmanager
def extra_buffers_off_on_amx():
    """Models opened inside keep their weights in plain CPU buffers where llama.cpp was built with AMX.
    llama.cpp's AMX buffers crash the process (SIGSEGV in decode) with the pinned llama-cpp-python
    0.3.36 on an AMX Xeon, on Q8_0 files of the embedded model and of tiny models alike (measured; with
    the extra buffer types off the same files decode). Elsewhere llama.cpp's defaults stay, its
    repacked kernels included."""
    import llama_cpp.llama_cpp as bindings

    if b"AMX_INT8 = 1" not in bindings.llama_print_system_info():
        yield
        return
    defaults = bindings.llama_model_default_params

    def without_extra_buffers():
        params = defaults()
        params.use_extra_bufts = False
        return params

    bindings.llama_model_default_params = without_extra_buffers
    try:
        yield
    finally:
        bindings.llama_model_default_params = defaults


@contextlib.contextmanager
def quiet_stderr():
    """llama.cpp prints its loader log on fd 2 even with verbose=False; keep the terminal for shrink."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def as_if_from_disk(path: Path) -> None:
    """Drop the system's cached pages of the artifact (a file, or every file of a directory), written
    to disk first, so that the runtime timed next reads it as a deployment loads it. The same bytes
    decode at different speeds by how their pages came into the cache: the embedded model's F16 GGUF
    took 34-35 ms a token from a copy made hours earlier and 31.6-32.8 ms once its pages were dropped and
    read back (llama.cpp mmaps its weights; measured here, 2 threads). A page some process still maps
    stays; best effort: no-op where the system has no posix_fadvise or the filesystem refuses."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if not file.is_file():
            continue
        try:
            descriptor = os.open(file, os.O_RDONLY)
        except OSError:
            continue  # the runtime's own open says what is wrong with the file
        try:
            os.fsync(descriptor)  # a dirty page cannot be dropped
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        except OSError:
            pass  # a filesystem without fsync (squashfs, some FUSE mounts): timed as cached
        finally:
            os.close(descriptor)


def timed_runs(prefill: Callable[[], Any], decode: Callable[[Any, int], Any], gen: list[int],
               repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of each prefill and of each decoded token over `repeats` runs after one warm-up run
    (page-in, kernel selection), which is dropped. `prefill()` starts a sequence and returns the
    runtime's state; `decode(state, token)` feeds one token and returns the new state."""
    prefill_s: list[float] = []
    decode_s: list[float] = []
    for run in range(repeats + 1):
        start = time.perf_counter()
        state = prefill()
        elapsed = time.perf_counter() - start
        steps = []
        for token in gen:
            start = time.perf_counter()
            state = decode(state, token)
            steps.append(time.perf_counter() - start)
        if run:
            prefill_s.append(elapsed)
            decode_s += steps
    return prefill_s, decode_s
